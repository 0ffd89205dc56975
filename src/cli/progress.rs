//! Progress bars on a terminal, nothing otherwise.

use std::io::IsTerminal;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::store::Progress;

fn target() -> ProgressDrawTarget {
    if std::io::stderr().is_terminal() {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    }
}

/// A byte-count progress bar on stderr, drawn only when stderr is a terminal.
pub struct Bar(ProgressBar);

impl Bar {
    pub fn new(what: &str) -> Bar {
        Bar::with(what, ProgressBar::with_draw_target(Some(0), target()))
    }

    /// A bar among several drawn together (one per destination of a copy).
    pub fn in_group(group: &MultiProgress, what: &str) -> Bar {
        Bar::with(what, group.add(ProgressBar::new(0)))
    }

    /// Bars drawn together on a terminal.
    pub fn group() -> MultiProgress {
        MultiProgress::with_draw_target(target())
    }

    fn with(what: &str, pb: ProgressBar) -> Bar {
        pb.set_style(
            ProgressStyle::with_template(
                "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        pb.set_message(what.to_string());
        Bar(pb)
    }

    pub fn finish(&self) {
        self.0.finish_and_clear();
    }
}

impl Progress for Bar {
    fn start(&self, total: u64) {
        self.0.set_length(total);
    }
    fn add(&self, bytes: u64) {
        self.0.inc(bytes);
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        self.0.finish_and_clear();
    }
}
