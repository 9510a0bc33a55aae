//! qemu-img's `-p` progress: `    (12.34/100%)\r` lines on stdout, whether or not stdout is
//! a terminal, one at the start, one each time another percent is done, and the final
//! `(100.00/100%)` twice followed by a newline, as qemu-img prints them.

use std::io::Write;
use std::sync::Mutex;

/// Progress of one operation over `total` units.
pub struct Progress {
    total: u64,
    /// Units done, and the percentage last printed.
    state: Mutex<(u64, f64)>,
}

impl Progress {
    /// Starts reporting (prints `0.00`); `None` when `-p` was not given.
    pub fn start(enabled: bool, total: u64) -> Option<Progress> {
        if !enabled {
            return None;
        }
        let p = Progress {
            total,
            state: Mutex::new((0, 0.0)),
        };
        print_line(0.0, "");
        Some(p)
    }

    /// Counts `n` more units done; prints when another percent is complete.
    pub fn add(&self, n: u64) {
        let mut st = self.state.lock().unwrap();
        st.0 = (st.0 + n).min(self.total);
        let pct = if self.total == 0 {
            100.0
        } else {
            st.0 as f64 * 100.0 / self.total as f64
        };
        if pct - st.1 >= 1.0 || (pct == 100.0 && st.1 < 100.0) {
            st.1 = pct;
            print_line(pct, "");
        }
    }

    /// Prints only the last line, as qemu-img convert ends: nothing copied (an empty
    /// image) leaves the report at 0% until that line.
    pub fn end(&self) {
        print_line(100.0, "\n");
    }

    /// Prints the end of the report.
    pub fn finish(&self) {
        let st = *self.state.lock().unwrap();
        if st.1 < 100.0 {
            print_line(100.0, "");
        }
        print_line(100.0, "\n");
    }
}

fn print_line(pct: f64, end: &str) {
    let mut out = std::io::stdout().lock();
    // A closed stdout must not fail the operation.
    let _ = write!(out, "    ({pct:.2}/100%)\r{end}");
    let _ = out.flush();
}

/// Counts `n` units done on a progress report, if there is one.
pub fn add(p: &Option<Progress>, n: u64) {
    if let Some(p) = p {
        p.add(n);
    }
}
