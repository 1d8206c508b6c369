//! `ckpt-user top`: a live full-screen view of lock contention, in the manner of top:
//! contended locks first (longest wait first) with their holders and waiters, leases
//! being broken counting down to their deadline, deleted-but-open files by pinned
//! bytes, and the agent's health.
//!
//! Each refresh reads the same tables as `locks`, `graph` and `deleted`; between
//! refreshes the screen is redrawn every quarter second from the deadlines and wait
//! starts already read (CLOCK_MONOTONIC), so waits count up and leases count down
//! smoothly. Fits 80x24. Keys: q (or Esc, Ctrl-C) quits, space freezes, s changes
//! the sort, f filters by pid or cgroup.

use std::{
    io::Stdout,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use aya::maps::{Map, MapData, PerCpuArray};
use ckpt_common::{counters::Counter, names};
use ratatui::{
    backend::CrosstermBackend,
    crossterm::{
        event::{self, Event, KeyCode, KeyEvent, KeyEventKind, KeyModifiers},
        execute,
        terminal::{disable_raw_mode, enable_raw_mode, EnterAlternateScreen, LeaveAlternateScreen},
    },
    layout::{Constraint, Layout},
    style::{Modifier, Style},
    text::Line,
    widgets::{Block, Paragraph},
    Frame, Terminal,
};

use crate::{
    ghost::view::{self as deleted, DeletedFile},
    lock::{
        graph,
        view::{filter, live_rows, LockRow, PidFilter},
    },
    tracer::pins::PinDir,
};

/// How contended locks are ordered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sort {
    /// The longest current wait first.
    Wait,
    /// The most waiters first.
    Waiters,
    /// By path.
    Path,
}

impl Sort {
    fn next(self) -> Sort {
        match self {
            Sort::Wait => Sort::Waiters,
            Sort::Waiters => Sort::Path,
            Sort::Path => Sort::Wait,
        }
    }

    fn label(self) -> &'static str {
        match self {
            Sort::Wait => "longest wait",
            Sort::Waiters => "most waiters",
            Sort::Path => "path",
        }
    }
}

/// What the agent says about itself.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Health {
    pub running: bool,
    /// Records lost because a map was full: (what, how many).
    pub lost: Vec<(&'static str, u64)>,
}

/// One refresh's data.
pub struct Snapshot {
    /// Rows with at least one waiter, or leases being broken (selected processes).
    pub rows: Vec<LockRow>,
    pub held: usize,
    pub deleted: Vec<DeletedFile>,
    pub health: Health,
    pub deadlocks: usize,
    /// CLOCK_MONOTONIC ns when read: waits and deadlines are shown relative to now.
    pub read_ns: u64,
    pub read_ms: f64,
}

fn health(pins: &PinDir) -> Health {
    if !pins.agent_running() {
        return Health::default();
    }
    let counters = MapData::from_pin(pins.map(names::COUNTERS))
        .ok()
        .and_then(|m| PerCpuArray::<MapData, u64>::try_from(Map::PerCpuArray(m)).ok());
    let total = |c: Counter| {
        counters
            .as_ref()
            .and_then(|m| m.get(&(c as u32), 0).ok())
            .map_or(0, |v| v.iter().sum())
    };
    Health {
        running: true,
        lost: Counter::LOSSES
            .into_iter()
            .map(|(c, what)| (what, total(c)))
            .collect(),
    }
}

/// Reads everything once.
pub fn snapshot(pins: &PinDir, pids: &PidFilter) -> Result<Snapshot> {
    let t0 = Instant::now();
    let (mut rows, _) = live_rows(pins)?;
    let a = graph::analyse(&rows, graph::threads_of);
    graph::mark(&mut rows, &a);
    let rows = filter(rows, pids);
    let held = rows.len();
    let rows: Vec<LockRow> = rows
        .into_iter()
        .filter(|r| {
            !r.waiters.is_empty() || r.lease.as_ref().is_some_and(|l| l.state == "breaking")
        })
        .collect();
    // The agent's table if fresh (its background scan), else a scan now.
    let (entries, _, source) = deleted::entries(pins, Some(Duration::from_secs(5)))?;
    let mut files = deleted::group(&entries, |p| {
        pids.as_ref().is_none_or(|set| set.contains(&p))
    });
    deleted::refresh_sizes(&mut files, source);
    files.sort_by_key(|f| std::cmp::Reverse(f.bytes));
    Ok(Snapshot {
        rows,
        held,
        deleted: files,
        health: health(pins),
        deadlocks: a
            .cycles
            .iter()
            .filter(|c| c.kind == graph::CycleKind::Deadlock)
            .count(),
        read_ns: crate::sys::monotonic_ns(),
        read_ms: t0.elapsed().as_secs_f64() * 1e3,
    })
}

/// The longest current wait of a row, in ms at `now_ns`.
fn longest_wait_ms(r: &LockRow, now_ns: u64) -> u64 {
    r.waiters
        .iter()
        .filter_map(|w| w.since_monotonic_ns)
        .map(|s| now_ns.saturating_sub(s) / 1_000_000)
        .max()
        .unwrap_or(0)
}

fn secs(ms: i64) -> String {
    format!("{:.1}s", ms as f64 / 1000.0)
}

fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "K", "M", "G", "T"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes}B")
    } else {
        format!("{v:.1}{}", UNITS[u])
    }
}

fn cut(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        return s.to_string();
    }
    let tail: String = s
        .chars()
        .rev()
        .take(n.saturating_sub(1))
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    format!("…{tail}")
}

/// The screen's lines for a snapshot at `now_ns`: contended locks, leases being
/// broken, deleted files (pure: tested without a terminal).
pub fn lines(s: &Snapshot, sort: Sort, now_ns: u64) -> (Vec<String>, Vec<String>, Vec<String>) {
    let mut contended: Vec<&LockRow> = s.rows.iter().filter(|r| !r.waiters.is_empty()).collect();
    match sort {
        Sort::Wait => contended.sort_by_key(|r| std::cmp::Reverse(longest_wait_ms(r, now_ns))),
        Sort::Waiters => contended.sort_by_key(|r| std::cmp::Reverse(r.waiters.len())),
        Sort::Path => contended.sort_by(|a, b| a.path.cmp(&b.path)),
    }
    let locks = contended
        .iter()
        .map(|r| {
            let waiters: Vec<String> = r
                .waiters
                .iter()
                .map(|w| match w.since_monotonic_ns {
                    Some(t) => format!(
                        "{} {}",
                        w.pid,
                        secs((now_ns.saturating_sub(t) / 1_000_000) as i64)
                    ),
                    None => w.pid.to_string(),
                })
                .collect();
            format!(
                "{}{:<5} {:<5} {:<22} {:>7} {:<9} <- {}",
                if r.deadlock { "!" } else { " " },
                r.kind,
                r.lock_type.map_or("?", |t| t.label()),
                cut(r.path.as_deref().unwrap_or("?"), 22),
                r.pid.map_or("-".into(), |p| p.to_string()),
                cut(r.command.as_deref().unwrap_or("?"), 9),
                waiters.join(", ")
            )
        })
        .collect();
    let leases = s
        .rows
        .iter()
        .filter_map(|r| Some((r, r.lease.as_ref()?)))
        .filter(|(_, l)| l.state == "breaking")
        .map(|(r, l)| {
            let left = match l.break_deadline_monotonic_ns {
                Some(d) if d > now_ns => {
                    format!("{} left", secs(((d - now_ns) / 1_000_000) as i64))
                }
                Some(_) => "overdue".into(),
                None => "? left".into(),
            };
            let breakers: Vec<String> = l.breakers.iter().map(|b| b.pid.to_string()).collect();
            format!(
                " {:<22} {:>7} {:<9} -> {:<6} {:>10}  breakers {}",
                cut(r.path.as_deref().unwrap_or("?"), 22),
                r.pid.map_or("-".into(), |p| p.to_string()),
                cut(r.command.as_deref().unwrap_or("?"), 9),
                l.target_type,
                left,
                if breakers.is_empty() {
                    "-".into()
                } else {
                    breakers.join(",")
                }
            )
        })
        .collect();
    let deleted = s
        .deleted
        .iter()
        .map(|f| {
            let pids: std::collections::BTreeSet<u32> = f
                .holders
                .iter()
                .map(super::super::ghost::view::Holder::pid)
                .collect();
            let holders: Vec<String> = pids.iter().map(u32::to_string).collect();
            format!(
                " {:>8} {:<40} {}",
                human(f.bytes),
                cut(&f.path, 40),
                holders.join(",")
            )
        })
        .collect();
    (locks, leases, deleted)
}

/// The header: counts and the agent's health.
pub fn header(s: &Snapshot, filter: &str, sort: Sort, frozen: bool) -> Vec<String> {
    let waiting: usize = s.rows.iter().map(|r| r.waiters.len()).sum();
    let breaking = s
        .rows
        .iter()
        .filter(|r| r.lease.as_ref().is_some_and(|l| l.state == "breaking"))
        .count();
    let agent = if !s.health.running {
        "agent: not running (no waiting times or break starts)".to_string()
    } else {
        let lost: Vec<String> = s
            .health
            .lost
            .iter()
            .filter(|(_, n)| *n > 0)
            .map(|(w, n)| format!("{n} {w}"))
            .collect();
        if lost.is_empty() {
            "agent: running, nothing lost".into()
        } else {
            format!("agent: running, LOST {}", lost.join(", "))
        }
    };
    vec![
        format!(
            "ckpt top - {} locks, {} contended, {waiting} waiting, {breaking} leases breaking{}, {} deleted files",
            s.held,
            s.rows.iter().filter(|r| !r.waiters.is_empty()).count(),
            if s.deadlocks > 0 {
                format!(", {} DEADLOCKS", s.deadlocks)
            } else {
                String::new()
            },
            s.deleted.len()
        ),
        format!(
            "{}{agent} | read {:.0} ms | sort: {} | filter: {}",
            if frozen { "FROZEN | " } else { "" },
            s.read_ms,
            sort.label(),
            if filter.is_empty() {
                "all".to_string()
            } else {
                cut(filter, 24)
            },
        ),
    ]
}

/// Set by SIGTERM and SIGHUP (a closed terminal): the loop ends and the terminal is
/// put back.
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_stop(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

fn catch_stop() {
    use nix::sys::signal::Signal;
    crate::sys::on_signals(&[Signal::SIGTERM, Signal::SIGHUP], on_stop);
}

/// Puts the terminal back however the view ends (error, panic unwinding).
struct Screen(Terminal<CrosstermBackend<Stdout>>);

impl Screen {
    fn open() -> Result<Screen> {
        enable_raw_mode().context("ckpt-user top needs a terminal")?;
        let mut out = std::io::stdout();
        execute!(out, EnterAlternateScreen)?;
        Ok(Screen(Terminal::new(CrosstermBackend::new(out))?))
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        let _ = disable_raw_mode();
        let _ = execute!(self.0.backend_mut(), LeaveAlternateScreen);
        let _ = self.0.show_cursor();
    }
}

pub struct Options {
    pub pins: PinDir,
    pub cgroup: Option<String>,
    pub pid: Option<u32>,
    pub delay: Duration,
}

/// `top --batch`: one read, printed as text (every line, not cut to a screen), for
/// scripts and logs, as `top -b -n 1` does.
pub fn batch(opts: &Options) -> Result<String> {
    let snap = snapshot(
        &opts.pins,
        &crate::cli::pid_filter(opts.cgroup.as_deref(), opts.pid)?,
    )?;
    let filter = opts
        .cgroup
        .clone()
        .or(opts.pid.map(|p| p.to_string()))
        .unwrap_or_default();
    let mut out = header(&snap, &filter, Sort::Wait, false).join("\n");
    let (locks, leases, deleted) = lines(&snap, Sort::Wait, crate::sys::monotonic_ns());
    for (title, body) in [
        (
            "contended locks: kind type path holder <- waiters (waited)",
            locks,
        ),
        (
            "leases being broken: path holder -> target, time left",
            leases,
        ),
        ("deleted but open: pinned path holders", deleted),
    ] {
        out.push_str(&format!("\n\n{title}\n"));
        for l in body {
            out.push_str(&l);
            out.push('\n');
        }
    }
    Ok(out)
}

/// The filter typed after `f`: a pid, or a cgroup.
fn parse_filter(text: &str) -> (Option<String>, Option<u32>) {
    let t = text.trim();
    if t.is_empty() {
        (None, None)
    } else if let Ok(pid) = t.parse() {
        (None, Some(pid))
    } else {
        (Some(t.to_string()), None)
    }
}

fn draw(f: &mut Frame, s: &Snapshot, head: &[String], sort: Sort, prompt: Option<&str>) {
    let now = crate::sys::monotonic_ns();
    let (locks, leases, deleted) = lines(s, sort, now);
    let leases_h = (leases.len() as u16 + 2).clamp(3, 7);
    let deleted_h = (deleted.len() as u16 + 2).clamp(3, 6);
    let [top, a, b, c, keys] = Layout::vertical([
        Constraint::Length(2),
        Constraint::Min(4),
        Constraint::Length(leases_h),
        Constraint::Length(deleted_h),
        Constraint::Length(1),
    ])
    .areas(f.area());
    f.render_widget(
        Paragraph::new(
            head.iter()
                .map(|l| Line::from(l.as_str()))
                .collect::<Vec<_>>(),
        ),
        top,
    );
    let section = |title: &str, body: Vec<String>, empty: &str| {
        let body = if body.is_empty() {
            vec![format!(" {empty}")]
        } else {
            body
        };
        Paragraph::new(body.into_iter().map(Line::from).collect::<Vec<_>>())
            .block(Block::bordered().title(title.to_string()))
    };
    f.render_widget(
        section(
            " contended locks: kind type path holder <- waiters (waited) ",
            locks,
            "no lock has waiters",
        ),
        a,
    );
    f.render_widget(
        section(
            " leases being broken: path holder -> target, time left ",
            leases,
            "no lease is being broken",
        ),
        b,
    );
    f.render_widget(
        section(
            " deleted but open: pinned path holders ",
            deleted,
            "no deleted file is held open",
        ),
        c,
    );
    let footer = match prompt {
        Some(p) => format!("filter (pid or cgroup, empty for all): {p}_"),
        None => "q quit  space freeze  s sort  f filter".into(),
    };
    f.render_widget(
        Paragraph::new(footer).style(Style::default().add_modifier(Modifier::REVERSED)),
        keys,
    );
}

enum Input {
    None,
    Ready,
    /// The terminal hung up (or stdin is gone).
    Closed,
}

/// Waits for a key on stdin. Polled here, not only by crossterm: on a terminal that
/// hung up, crossterm's own poll reads end-of-file in a loop and never returns (so not
/// even SIGTERM's flag would be seen).
fn wait_for_input(timeout: Duration) -> Input {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let stdin = std::io::stdin();
    let mut fds = [PollFd::new(
        std::os::fd::AsFd::as_fd(&stdin),
        PollFlags::POLLIN,
    )];
    let ms = PollTimeout::try_from(timeout).unwrap_or(PollTimeout::MAX);
    match poll(&mut fds, ms) {
        Ok(0) | Err(nix::errno::Errno::EINTR) => Input::None,
        Ok(_) => {
            let r = fds[0].revents().unwrap_or(PollFlags::empty());
            if r.intersects(PollFlags::POLLHUP | PollFlags::POLLERR | PollFlags::POLLNVAL) {
                Input::Closed
            } else {
                Input::Ready
            }
        }
        Err(_) => Input::Closed,
    }
}

/// What the keys change.
#[derive(Debug)]
struct Keys {
    sort: Sort,
    frozen: bool,
    /// The filter being typed after `f`.
    prompt: Option<String>,
    cgroup: Option<String>,
    pid: Option<u32>,
    /// The filter as shown.
    filter: String,
    /// Read the tables at once (a new filter).
    refresh: bool,
}

impl Keys {
    /// Applies a key; true to quit.
    fn press(&mut self, code: KeyCode, modifiers: KeyModifiers) -> bool {
        if let Some(p) = self.prompt.as_mut() {
            match code {
                KeyCode::Enter => {
                    (self.cgroup, self.pid) = parse_filter(p);
                    self.filter = p.trim().to_string();
                    self.prompt = None;
                    self.refresh = true;
                }
                KeyCode::Esc => self.prompt = None,
                KeyCode::Backspace => {
                    p.pop();
                }
                KeyCode::Char(c) => p.push(c),
                _ => {}
            }
            return false;
        }
        match code {
            KeyCode::Char('q') | KeyCode::Esc => return true,
            KeyCode::Char('c') if modifiers.contains(KeyModifiers::CONTROL) => return true,
            KeyCode::Char(' ') => self.frozen = !self.frozen,
            KeyCode::Char('s') => self.sort = self.sort.next(),
            KeyCode::Char('f') => self.prompt = Some(String::new()),
            _ => {}
        }
        false
    }
}

/// Runs the view until q, Ctrl-C, SIGTERM or a closed terminal.
pub fn run(opts: Options) -> Result<()> {
    let pids_of = |k: &Keys| crate::cli::pid_filter(k.cgroup.as_deref(), k.pid);
    let mut keys = Keys {
        sort: Sort::Wait,
        frozen: false,
        prompt: None,
        filter: opts
            .cgroup
            .clone()
            .or(opts.pid.map(|p| p.to_string()))
            .unwrap_or_default(),
        cgroup: opts.cgroup,
        pid: opts.pid,
        refresh: false,
    };
    // Before the screen: a bad --cgroup is a one-line error on a normal terminal.
    let mut snap = snapshot(&opts.pins, &pids_of(&keys)?)?;
    catch_stop();
    let mut screen = Screen::open()?;
    let mut note: Option<String> = None;
    let mut last = Instant::now();
    loop {
        if STOP.load(Ordering::Relaxed) {
            return Ok(());
        }
        if keys.refresh || (!keys.frozen && last.elapsed() >= opts.delay) {
            match pids_of(&keys).and_then(|p| snapshot(&opts.pins, &p)) {
                Ok(s) => {
                    snap = s;
                    note = None;
                }
                Err(e) => note = Some(format!("{e:#}")),
            }
            last = Instant::now();
            keys.refresh = false;
        }
        let mut head = header(&snap, &keys.filter, keys.sort, keys.frozen);
        if let Some(n) = &note {
            head[1] = format!("error: {n}");
        }
        screen
            .0
            .draw(|f| draw(f, &snap, &head, keys.sort, keys.prompt.as_deref()))?;
        // Keys crossterm has already read (several arrive at once) come first.
        if !event::poll(Duration::ZERO)? {
            match wait_for_input(Duration::from_millis(250)) {
                Input::None => continue,
                Input::Closed => return Ok(()),
                Input::Ready => {}
            }
        }
        while event::poll(Duration::ZERO)? {
            if let Event::Key(KeyEvent {
                code,
                modifiers,
                kind: KeyEventKind::Press,
                ..
            }) = event::read()?
            {
                if keys.press(code, modifiers) {
                    return Ok(());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lock::{
        view::{test_lease, test_row, WaiterRow},
        HeldKind, LockKind,
    };

    fn snap() -> Snapshot {
        let mut a = test_row(HeldKind::Lock(LockKind::Posix), 10);
        let w = |pid: u32, since: u64| WaiterRow {
            pid,
            tid: Some(pid),
            command: None,
            kind: HeldKind::Lock(LockKind::Posix),
            lock_type: crate::lock::LockType::Write,
            start: 0,
            end: 0,
            waiting_ms: None,
            since_monotonic_ns: Some(since),
        };
        a.waiters = vec![w(11, 1_000_000_000)];
        let mut b = test_row(HeldKind::Lock(LockKind::Flock), 20);
        b.waiters = vec![w(21, 9_000_000_000), w(22, 9_500_000_000)];
        let mut lease = test_row(HeldKind::Lease, 30);
        let mut info = test_lease(0);
        info.break_deadline_monotonic_ns = Some(14_000_000_000);
        lease.lease = Some(Box::new(info));
        Snapshot {
            rows: vec![b, a, lease],
            held: 3,
            deleted: Vec::new(),
            health: Health {
                running: true,
                lost: vec![("waits", 0), ("breaks", 2)],
            },
            deadlocks: 0,
            read_ns: 10_000_000_000,
            read_ms: 5.0,
        }
    }

    #[test]
    fn waits_count_up_and_leases_down_from_the_clock() {
        let s = snap();
        let (locks, leases, deleted) = lines(&s, Sort::Wait, 10_000_000_000);
        // The longest wait (pid 11, since 1 s) first.
        assert!(locks[0].contains("11 9.0s"), "{locks:?}");
        assert!(locks[1].contains("21 1.0s, 22 0.5s"), "{locks:?}");
        assert!(leases[0].contains("4.0s left"), "{leases:?}");
        assert!(deleted.is_empty());
        let (locks, leases, _) = lines(&s, Sort::Wait, 12_000_000_000);
        assert!(locks[0].contains("11 11.0s"), "{locks:?}");
        assert!(leases[0].contains("2.0s left"), "{leases:?}");
        let (_, leases, _) = lines(&s, Sort::Wait, 15_000_000_000);
        assert!(leases[0].contains("overdue"), "{leases:?}");
        let (locks, _, _) = lines(&s, Sort::Waiters, 10_000_000_000);
        assert!(locks[0].contains("21 "), "{locks:?}");
    }

    #[test]
    fn the_header_says_what_the_agent_lost_and_the_lines_fit_80_columns() {
        let s = snap();
        let h = header(&s, "", Sort::Wait, true);
        assert!(
            h[0].contains("2 contended, 3 waiting, 1 leases breaking"),
            "{h:?}"
        );
        assert!(
            h[1].contains("LOST 2 breaks") && h[1].contains("FROZEN"),
            "{h:?}"
        );
        let (locks, leases, _) = lines(&s, Sort::Wait, 10_000_000_000);
        for l in locks.iter().chain(&leases) {
            assert!(l.chars().count() <= 78, "{l}");
        }
    }

    #[test]
    fn keys_freeze_sort_filter_and_quit() {
        let mut k = Keys {
            sort: Sort::Wait,
            frozen: false,
            prompt: None,
            cgroup: Some("job".into()),
            pid: None,
            filter: "job".into(),
            refresh: false,
        };
        let none = KeyModifiers::NONE;
        assert!(!k.press(KeyCode::Char(' '), none) && k.frozen);
        k.press(KeyCode::Char('s'), none);
        assert_eq!(k.sort, Sort::Waiters);
        k.press(KeyCode::Char('f'), none);
        for c in "42q".chars() {
            assert!(!k.press(KeyCode::Char(c), none), "typed, not a command");
        }
        k.press(KeyCode::Backspace, none);
        k.press(KeyCode::Enter, none);
        assert_eq!((k.cgroup.clone(), k.pid, k.refresh), (None, Some(42), true));
        assert_eq!(k.filter, "42");
        assert!(k.press(KeyCode::Char('c'), KeyModifiers::CONTROL));
        assert!(k.press(KeyCode::Char('q'), none));
    }

    #[test]
    fn a_filter_is_a_pid_or_a_cgroup() {
        assert_eq!(parse_filter(" 42 "), (None, Some(42)));
        assert_eq!(parse_filter("job"), (Some("job".into()), None));
        assert_eq!(parse_filter(""), (None, None));
    }
}
