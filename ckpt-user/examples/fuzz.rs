//! The standing fuzz harness's long run (`cargo xtask fuzz` builds and runs this; see
//! `ckpt_user::image::fuzz`). Prints one summary line; exit status 1 if any input
//! panicked (each kept under ckpt-user/fuzz/crashes as a regression test).
//!
//! fuzz [--seconds N] [--recompute-checksum] [--seed S] [--scratch DIR]

use std::path::PathBuf;

use ckpt_user::image::fuzz;

fn main() {
    let mut seconds = 60.0;
    let mut recompute = false;
    let mut seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(16, |d| d.as_nanos() as u64);
    let mut scratch = fuzz::scratch_base().join(format!("ckpt-fuzz-{}", std::process::id()));
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| usage(&a));
        match a.as_str() {
            "--seconds" => seconds = value().parse().unwrap_or_else(|_| usage("--seconds")),
            "--seed" => seed = value().parse().unwrap_or_else(|_| usage("--seed")),
            "--scratch" => scratch = PathBuf::from(value()),
            "--recompute-checksum" => recompute = true,
            _ => usage(&a),
        }
    }
    let dir = fuzz::corpus_dir();
    let corpus = fuzz::load_dir(&dir.join("seeds"))
        .into_iter()
        .chain(fuzz::load_dir(&dir.join("crashes")))
        .map(|(_, b)| b)
        .collect();
    // An abort (which no catch_unwind stops) leaves its input in current.img: the
    // caller keeps it.
    eprintln!(
        "fuzz: seed {seed}, {seconds} s, checksum {}, scratch {}",
        if recompute { "recomputed" } else { "kept" },
        scratch.display()
    );
    let stats = fuzz::run(&fuzz::Options {
        seconds,
        max_inputs: None,
        recompute_checksum: recompute,
        seed,
        corpus,
        scratch: scratch.clone(),
    });
    for (input, msg) in &stats.panics {
        let keep = dir.join("crashes").join(fuzz::crash_name(input));
        let _ = std::fs::write(&keep, input);
        eprintln!("fuzz: panic: {msg} (input kept as {})", keep.display());
    }
    println!(
        "fuzz: {} inputs in {:.1} s, {:.0} inputs/s: {} opened, {} refused, {} panics; slowest input {:.1} ms",
        stats.inputs,
        stats.elapsed.as_secs_f64(),
        stats.per_second(),
        stats.opened,
        stats.refused,
        stats.panics.len(),
        stats.slowest.as_secs_f64() * 1e3
    );
    let _ = std::fs::remove_dir_all(&scratch);
    std::process::exit(if stats.panics.is_empty() { 0 } else { 1 });
}

fn usage(what: &str) -> ! {
    eprintln!("fuzz: bad argument {what:?}; usage: fuzz [--seconds N] [--recompute-checksum] [--seed S] [--scratch DIR]");
    std::process::exit(2)
}
