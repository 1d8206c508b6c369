//! `ckpt-agent --metrics-textfile`: written atomically for node_exporter's textfile
//! collector, and accepted by it (prometheus-node-exporter from apt). Host only: the
//! VM images do not carry node_exporter.

use std::{
    process::{Command, Stdio},
    time::Duration,
};

use ckpt_tests::*;

/// Kills node_exporter on drop.
struct Exporter(std::process::Child);

impl Drop for Exporter {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn node_exporter_accepts_the_textfile() {
    require_root();
    let dir = Scratch::new();
    let prom = dir.0.join("ckpt.prom");
    let pins = std::path::PathBuf::from("/sys/fs/bpf").join(unique("ckpt-test"));
    let path = prom.display().to_string();
    let _agent = Agent::start_on(
        &pins,
        &["--metrics-textfile", &path, "--metrics-interval", "1"],
    );
    let text = wait_for(Duration::from_secs(10), "the textfile", || {
        std::fs::read_to_string(&prom).ok()
    });
    assert!(
        text.contains("ckpt_locks") || text.contains("ckpt_deleted_files"),
        "{text}"
    );
    // Atomic: only the file itself, never a temporary ending in .prom.
    for _ in 0..20 {
        let names: Vec<String> = std::fs::read_dir(&dir.0)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".prom"))
            .collect();
        assert_eq!(names, vec!["ckpt.prom".to_string()]);
        std::thread::sleep(Duration::from_millis(100));
    }
    let port = free_port();
    let exporter = Exporter(
        Command::new("prometheus-node-exporter")
            .args([
                "--collector.disable-defaults",
                "--collector.textfile",
                &format!("--collector.textfile.directory={}", dir.0.display()),
                &format!("--web.listen-address=127.0.0.1:{port}"),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus-node-exporter (cargo xtask setup installs it)"),
    );
    let scraped = wait_for(Duration::from_secs(10), "node_exporter", || {
        http_get(port, "/metrics")
    });
    drop(exporter);
    assert!(
        scraped.contains("node_textfile_scrape_error 0"),
        "node_exporter refused the textfile:\n{scraped}"
    );
    assert!(scraped.contains("ckpt_build_info{"), "{scraped}");
    assert!(scraped.contains("ckpt_wait_seconds_bucket{"), "{scraped}");
}
