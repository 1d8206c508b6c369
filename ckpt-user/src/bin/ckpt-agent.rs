use ckpt_user::{
    agent::{run, Options},
    cli::{report, AgentArgs},
    tracer::pins::PinDir,
};
use clap::Parser as _;
use tracing_subscriber::EnvFilter;

fn main() {
    let args = AgentArgs::parse();
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&args.log_level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    if let Some(w) = ckpt_user::lease::restore::repair_lease_break_time() {
        tracing::warn!("{w}");
    }
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => std::process::exit(report("ckpt-agent", &e.into())),
    };
    let opts = Options {
        pins: PinDir::new(args.pin_dir),
        unpin: args.unpin,
        tracing: ckpt_user::tracer::loader::Tracing {
            hold_times: args.hold_times,
            exact_deleted: args.exact_deleted,
        },
        metrics: ckpt_user::agent::MetricsOptions {
            addr: args.metrics,
            textfile: args.metrics_textfile,
            interval: std::time::Duration::from_secs(args.metrics_interval.max(1)),
            cgroups: args.metrics_cgroups,
        },
    };
    if let Err(e) = rt.block_on(run(opts)) {
        std::process::exit(report("ckpt-agent", &e));
    }
}
