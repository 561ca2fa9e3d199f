//! Progress of a job: a live bar on a terminal, nothing otherwise, and the
//! final summary either way.

use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How a job reports while it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// A live bar (stderr is a terminal, no `--json`, no `-q`).
    Bar,
    /// Nothing while running; the caller prints a summary at the end.
    Silent,
}

/// Live progress of a batch.
#[derive(Debug)]
pub struct Progress {
    bar: Option<ProgressBar>,
    done: u64,
    failed: u64,
    skipped: u64,
}

impl Progress {
    /// A progress display for `total` devices (if known).
    pub fn new(mode: Mode, total: Option<u64>) -> Self {
        let bar = (mode == Mode::Bar).then(|| {
            let bar = ProgressBar::with_draw_target(total, ProgressDrawTarget::stderr_with_hz(4));
            let template = if total.is_some() {
                "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} {per_sec} ETA {eta} {msg}"
            } else {
                "{spinner} [{elapsed_precise}] {pos} devices {per_sec} {msg}"
            };
            bar.set_style(
                ProgressStyle::with_template(template)
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            bar.enable_steady_tick(Duration::from_millis(250));
            bar
        });
        Progress {
            bar,
            done: 0,
            failed: 0,
            skipped: 0,
        }
    }

    /// One device finished: issued (`ok`), failed, or skipped as already done.
    pub fn record(&mut self, outcome: Outcome) {
        match outcome {
            Outcome::Done => self.done += 1,
            Outcome::Failed => self.failed += 1,
            Outcome::Skipped => self.skipped += 1,
        }
        if let Some(bar) = &self.bar {
            bar.inc(1);
            if (self.done + self.failed + self.skipped).is_multiple_of(256)
                || outcome == Outcome::Failed
            {
                bar.set_message(self.message());
            }
        }
    }

    /// Prints a line above the bar (or to stderr without one).
    pub fn println(&self, line: &str) {
        match &self.bar {
            Some(bar) => bar.println(line),
            None => eprintln!("{line}"),
        }
    }

    fn message(&self) -> String {
        format!(
            "done {} failed {} skipped {}",
            self.done, self.failed, self.skipped
        )
    }

    /// Removes the bar.
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.set_message(self.message());
            bar.finish_and_clear();
        }
    }
}

/// What became of one device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Issued and written.
    Done,
    /// Failed with a reason.
    Failed,
    /// Already done by an earlier run.
    Skipped,
}
