//! Stop strings: generation ends where the text first contains one of them,
//! and the stop text itself is never handed out. Streaming makes that subtle:
//! text that could be the start of a stop string is held back until the next
//! token shows whether it is.

/// Filters generated text against a set of stop strings.
pub struct StopText {
    stops: Vec<String>,
    /// Text seen but not yet released (at most the longest stop string).
    pending: String,
}

impl StopText {
    /// Empty stop strings are ignored.
    pub fn new(stops: &[String]) -> StopText {
        let stops: Vec<String> = stops.iter().filter(|s| !s.is_empty()).cloned().collect();
        let longest = stops.iter().map(String::len).max().unwrap_or(0);
        StopText {
            stops,
            pending: String::with_capacity(longest * 2 + 64),
        }
    }

    /// Adds generated text; appends to `out` what is now safe to release.
    /// Returns true when a stop string was found (then `out` ends just
    /// before it, and nothing more should be generated).
    pub fn push(&mut self, text: &str, out: &mut String) -> bool {
        if self.stops.is_empty() {
            out.push_str(text);
            return false;
        }
        self.pending.push_str(text);
        if let Some(at) = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min()
        {
            out.push_str(&self.pending[..at]);
            self.pending.clear();
            return true;
        }
        let keep = self.partial_suffix();
        let release = self.pending.len() - keep;
        out.push_str(&self.pending[..release]);
        self.pending.drain(..release);
        false
    }

    /// The end of generation: whatever was held back is released.
    pub fn finish(&mut self, out: &mut String) {
        out.push_str(&self.pending);
        self.pending.clear();
    }

    /// Length of the longest suffix of `pending` that begins some stop string.
    fn partial_suffix(&self) -> usize {
        let p = &self.pending;
        for (start, _) in p.char_indices() {
            let tail = &p[start..];
            if self
                .stops
                .iter()
                .any(|s| s.len() > tail.len() && s.starts_with(tail))
            {
                return tail.len();
            }
        }
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(stops: &[&str], pieces: &[&str]) -> (Vec<String>, bool) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut st = StopText::new(&stops);
        let mut released = Vec::new();
        for p in pieces {
            let mut out = String::new();
            if st.push(p, &mut out) {
                released.push(out);
                return (released, true);
            }
            released.push(out);
        }
        let mut out = String::new();
        st.finish(&mut out);
        released.push(out);
        (released, false)
    }

    #[test]
    fn stop_split_over_tokens_is_held_back_and_cut() {
        let (r, stopped) = feed(&["\nUser:"], &["Hello", " world\n", "Us", "er:", " more"]);
        assert!(stopped);
        assert_eq!(r, ["Hello", " world", "", ""]);
        assert_eq!(r.concat(), "Hello world");
    }

    #[test]
    fn false_alarm_is_released() {
        let (r, stopped) = feed(&["END"], &["a E", "N", "x", "!"]);
        assert!(!stopped);
        assert_eq!(r.concat(), "a ENx!");
        assert_eq!(r[0], "a ", "a possible start of the stop string waits");
    }

    #[test]
    fn earliest_stop_wins_and_multibyte_is_safe() {
        let (r, stopped) = feed(&["ß!", "é"], &["aaé", "ß!"]);
        assert!(stopped);
        assert_eq!(r.concat(), "aa");
        let (r, stopped) = feed(&["€€"], &["x€", "y"]);
        assert!(!stopped);
        assert_eq!(r.concat(), "x€y");
    }

    #[test]
    fn no_stops_passes_through() {
        let (r, stopped) = feed(&[""], &["a", "b"]);
        assert!(!stopped);
        assert_eq!(r, ["a", "b", ""]);
    }
}
