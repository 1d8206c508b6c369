//! `ckpt-user top` in a real terminal (tmux, 80x24): a waiter's time counts up, a
//! lease being broken counts down, the keys work, and q and a closed terminal end it.

use std::{process::Command, time::Duration};

use ckpt_tests::*;

/// A tmux session of its own (its own server socket), killed on drop.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn start(cmd: &str) -> Tmux {
        let t = Tmux {
            socket: unique("ckpt-top"),
        };
        let ok = t
            .tmux(&["new-session", "-d", "-x", "80", "-y", "24", cmd])
            .status
            .success();
        assert!(
            ok,
            "tmux new-session failed (cargo xtask setup installs tmux)"
        );
        t
    }

    fn tmux(&self, args: &[&str]) -> std::process::Output {
        Command::new("tmux")
            .args(["-L", &self.socket])
            .args(args)
            .output()
            .expect("tmux (cargo xtask setup installs it)")
    }

    fn screen(&self) -> String {
        String::from_utf8_lossy(&self.tmux(&["capture-pane", "-p"]).stdout).into_owned()
    }

    fn keys(&self, keys: &[&str]) {
        let mut args = vec!["send-keys"];
        args.extend_from_slice(keys);
        self.tmux(&args);
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        self.tmux(&["kill-server"]);
    }
}

/// Seconds shown after `pid ` on the line of the screen that contains `marker`.
fn seconds_after(screen: &str, marker: &str, pid: u32) -> Option<f64> {
    let line = screen.lines().find(|l| l.contains(marker))?;
    let at = line.find(&format!("{pid} "))? + pid.to_string().len() + 1;
    line[at..].split('s').next()?.trim().parse().ok()
}

fn lease_left(screen: &str, path: &str) -> Option<f64> {
    let line = screen
        .lines()
        .find(|l| l.contains(path) && l.contains("left"))?;
    let before = line.split("s left").next()?;
    before.rsplit(' ').next()?.parse().ok()
}

#[test]
fn top_counts_waits_up_and_leases_down_and_quits_cleanly() {
    require_root();
    let agent = Agent::start();
    let _sysctl = LeaseBreakTime::set(30);
    let dir = Scratch::new();
    let cg = Cgroup::new(false);
    let (locked, leased) = (dir.file("locked"), dir.file("leased"));
    std::fs::write(&leased, b"x").unwrap();
    let mut holder = cg.locker();
    let mut waiter = cg.locker();
    let mut lessee = cg.locker();
    let mut breaker = cg.locker();
    holder.cmd(&format!("open a {locked}"));
    holder.cmd("posix a w 0 10");
    waiter.cmd(&format!("open a {locked}"));
    waiter.send("posix a w 0 10 wait");
    lessee.cmd(&format!("openmode l {leased} r"));
    lessee.cmd("lease l w");
    breaker.send(&format!("openmode y {leased} w"));
    let done = dir.0.join("exit").display().to_string();
    let cmd = format!(
        "{} --pin-dir {} top -d 1 --cgroup {}; echo $? > {done}",
        bin("ckpt-user").display(),
        agent.pin_dir.display(),
        cg.path.display()
    );
    let t = Tmux::start(&cmd);
    let (w, b) = (waiter.pid(), breaker.pid());
    // Long paths are cut from the left: the file names are on screen.
    let first = wait_for(Duration::from_secs(10), "the waiter and the lease", || {
        let s = t.screen();
        Some((
            seconds_after(&s, "/locked", w)?,
            lease_left(&s, "/leased")?,
            s,
        ))
    });
    assert!(first.2.contains("ckpt top - "), "{}", first.2);
    assert!(first.2.lines().count() <= 24, "{}", first.2);
    std::thread::sleep(Duration::from_millis(2500));
    let s = t.screen();
    let waited = seconds_after(&s, "/locked", w).unwrap();
    let left = lease_left(&s, "/leased").unwrap();
    assert!(waited >= first.0 + 2.0, "{} -> {waited}: {s}", first.0);
    assert!(left <= first.1 - 2.0, "{} -> {left}: {s}", first.1);
    assert!(s.contains(&format!("breakers {b}")), "{s}");

    // The same, once, as text (`--batch`).
    let pins = agent.pin_dir.display().to_string();
    let cgroup = cg.path.display().to_string();
    let (code, out, err) = ckpt_user(&["--pin-dir", &pins, "top", "--batch", "--cgroup", &cgroup]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("ckpt top - "), "{out}");
    assert!(out.contains(&format!("breakers {b}")), "{out}");
    assert!(seconds_after(&out, "/locked", w).is_some(), "{out}");

    // Space freezes, f filters (here to the waiter: the lease row goes), q quits.
    t.keys(&["Space"]);
    wait_for(Duration::from_secs(5), "FROZEN", || {
        t.screen().contains("FROZEN").then_some(())
    });
    t.keys(&["Space", "f"]);
    t.keys(&[&w.to_string(), "Enter"]);
    wait_for(Duration::from_secs(5), "the filter", || {
        let s = t.screen();
        (s.contains(&format!("filter: {w}")) && !s.contains("/leased")).then_some(())
    });
    t.keys(&["q"]);
    let code = wait_for(Duration::from_secs(5), "top to quit", || {
        std::fs::read_to_string(&done)
            .ok()
            .filter(|c| c.ends_with('\n'))
    });
    assert_eq!(code.trim(), "0");
}

#[test]
fn a_closed_terminal_ends_top() {
    require_root();
    let agent = Agent::start();
    let dir = Scratch::new();
    let marker = dir.0.join("pid").display().to_string();
    let cmd = format!(
        "echo $$ > {marker}; exec {} --pin-dir {} top -d 1",
        bin("ckpt-user").display(),
        agent.pin_dir.display()
    );
    let t = Tmux::start(&cmd);
    let pid: i32 = wait_for(Duration::from_secs(5), "top to start", || {
        std::fs::read_to_string(&marker).ok()?.trim().parse().ok()
    });
    wait_for(Duration::from_secs(5), "its screen", || {
        t.screen().contains("ckpt top").then_some(())
    });
    drop(t);
    // Gone, or a zombie (its parent, tmux, is gone too).
    wait_for(Duration::from_secs(5), "top to exit", || {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        (status.is_empty() || status.contains("State:\tZ")).then_some(())
    });
}
