//! `dm session`: list, show and watch sessions, with a progress bar per
//! task.

use super::*;

#[derive(Subcommand)]
pub enum SessionCmd {
    /// List recent sessions.
    List {
        /// How many.
        #[arg(long, default_value_t = 20)]
        limit: u32,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show a session and its tasks.
    Show {
        /// Session id.
        id: u64,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Live progress bars per task until the session ends (exit 1 if it failed).
    Watch {
        /// Session id.
        id: u64,
    },
}

pub fn session(s: &ServerArgs, c: SessionCmd) -> Result<u8, Failure> {
    let cl = s.client()?;
    match c {
        SessionCmd::List { limit, json } => {
            let ss: Vec<Session> = cl.sessions(limit)?;
            if json {
                return print_json(&ss);
            }
            println!(
                "{:>6} {:<20} {:<8} {:<8} {:>5} CREATED",
                "ID", "JOB", "KIND", "STATE", "TASKS"
            );
            for s in ss {
                println!(
                    "{:>6} {:<20} {:<8} {:<8} {:>5} {}",
                    s.id,
                    s.job,
                    s.kind.as_str(),
                    s.state.as_str(),
                    s.tasks.len(),
                    s.created
                );
            }
            Ok(0)
        }
        SessionCmd::Show { id, json } => {
            let s: Session = cl.session(id)?;
            if json {
                return print_json(&s);
            }
            show_session(&s);
            Ok(if s.state == State::Failed { 1 } else { 0 })
        }
        SessionCmd::Watch { id } => {
            let end = watch(&cl, id, false)?;
            finish(&end, false)
        }
    }
}

pub(super) fn show_session(s: &Session) {
    println!(
        "session {} of job {} ({}): {}",
        s.id,
        s.job,
        s.kind.as_str(),
        s.state.as_str()
    );
    println!(
        "{:>6} {:<24} {:<8} {:<12} {:<16} {:>3} {:<10} POINT / ERROR",
        "TASK", "DISK", "STATE", "PROXY", "MODE", "TRY", "BOTTLENECK"
    );
    for t in &s.tasks {
        println!(
            "{:>6} {:<24} {:<8} {:<12} {:<16} {:>3} {:<10} {}",
            t.id,
            t.disk,
            t.state.as_str(),
            t.proxy.as_deref().unwrap_or("-"),
            t.mode.as_deref().unwrap_or("-"),
            t.attempt,
            t.bottleneck.as_deref().unwrap_or("-"),
            t.point
                .as_ref()
                .map(|p| p.as_str())
                .or(t.error.as_deref())
                .unwrap_or("")
        );
        if let (State::Queued, Some(w)) = (t.state, &t.waiting) {
            println!("{:>6}   waiting: {w}", "");
        }
        if let Some(r) = &t.replica {
            println!("{:>6}   replica {r}", "");
        }
        if let Some(c) = &t.consistency {
            match c.frozen_ms {
                Some(ms) => println!(
                    "{:>6}   {}-consistent ({}; frozen {ms} ms)",
                    "", c.level, c.reason
                ),
                None => println!("{:>6}   {}-consistent ({})", "", c.level, c.reason),
            }
        }
        if let Some(w) = t.wire_bytes {
            println!(
                "{:>6}   {} stored, {} on the wire to the repository service",
                "",
                human(t.bytes_stored.unwrap_or(0)),
                human(w)
            );
        }
        for a in &t.attempts {
            println!(
                "{:>6}   attempt {} on {}: {}",
                "",
                a.attempt,
                a.proxy.as_deref().unwrap_or("-"),
                a.reason
            );
        }
    }
}

pub(super) fn human(b: u64) -> String {
    indicatif::HumanBytes(b).to_string()
}

pub(super) fn finish(s: &Session, json: bool) -> Result<u8, Failure> {
    if json {
        print_json(s)?;
    } else {
        show_session(s);
    }
    Ok(if s.state == State::Failed { 1 } else { 0 })
}

/// Poll a session until it ends, with one progress bar per task (when
/// stderr is a terminal and `quiet` is false).
pub(super) fn watch(cl: &Client, id: u64, quiet: bool) -> Result<Session, Failure> {
    use std::io::IsTerminal;
    let show = !quiet && std::io::stderr().is_terminal();
    let mp = MultiProgress::new();
    let style = ProgressStyle::with_template(
        "{prefix:<24} {msg:<28} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ");
    let mut bars: HashMap<u64, ProgressBar> = HashMap::new();
    let end = cl.wait_session(id, |s| -> Result<(), Failure> {
        if show {
            for t in &s.tasks {
                let b = bars.entry(t.id).or_insert_with(|| {
                    let b = mp.add(ProgressBar::new(t.total.max(1)));
                    b.set_style(style.clone());
                    b.set_prefix(t.disk.to_string());
                    b
                });
                b.set_length(t.total.max(1));
                b.set_position(t.done);
                if let (State::Queued, Some(w)) = (t.state, &t.waiting) {
                    b.set_message(format!("queued: {w}"));
                    continue;
                }
                b.set_message(format!(
                    "{} {}{}",
                    t.state.as_str(),
                    t.proxy.as_deref().unwrap_or(""),
                    t.mode
                        .as_deref()
                        .map(|m| format!(" ({m})"))
                        .unwrap_or_default()
                ));
                if t.state.is_final() && !b.is_finished() {
                    b.finish();
                }
            }
        }
        Ok(())
    })?;
    if show {
        let _ = mp.clear();
    }
    Ok(end)
}
