//! The swap device's free-slot bitmap: one bit per slot, a summary bit per word of it,
//! handed out next-fit from a cursor.

#[derive(Debug)]
pub(super) struct FreeMap {
    words: Vec<u64>,
    /// Bit `i` set when `words[i]` has a free slot: a search skips 4,096 full slots
    /// per zero summary word, so a nearly full device is not scanned slot word by word.
    summary: Vec<u64>,
    /// Free slots in `words`.
    free: u64,
    cursor: usize,
}

impl FreeMap {
    pub(super) fn new(words: Vec<u64>) -> FreeMap {
        let summary = (0..words.len().div_ceil(64))
            .map(|i| {
                (0..64)
                    .filter(|b| words.get(i * 64 + b).is_some_and(|&w| w != 0))
                    .fold(0u64, |m, b| m | 1 << b)
            })
            .collect();
        let free = words.iter().map(|w| u64::from(w.count_ones())).sum();
        FreeMap {
            words,
            summary,
            free,
            cursor: 0,
        }
    }

    /// Takes the next free slot at or after the cursor (next-fit, wrapping), if any.
    pub(super) fn take_next(&mut self) -> Option<u64> {
        if self.free == 0 {
            return None;
        }
        let w = self.next_word(self.cursor)?;
        let b = self.words[w].trailing_zeros() as usize;
        self.words[w] &= !(1 << b);
        if self.words[w] == 0 {
            self.summary[w / 64] &= !(1 << (w % 64));
        }
        self.free -= 1;
        self.cursor = w;
        Some((w * 64 + b) as u64)
    }

    /// The first word at or after `from` (wrapping) with a free slot.
    fn next_word(&self, from: usize) -> Option<usize> {
        let n = self.summary.len();
        let (s0, b0) = (from / 64, from % 64);
        // The rest of the cursor's summary word, then whole words, then its start.
        let first = self.summary[s0] & (u64::MAX << b0);
        if first != 0 {
            return Some(s0 * 64 + first.trailing_zeros() as usize);
        }
        for k in 1..=n {
            let s = (s0 + k) % n;
            let m = if s == s0 {
                self.summary[s] & !(u64::MAX << b0)
            } else {
                self.summary[s]
            };
            if m != 0 {
                return Some(s * 64 + m.trailing_zeros() as usize);
            }
        }
        None
    }

    pub(super) fn give_back(&mut self, slot: u64) {
        let w = (slot / 64) as usize;
        self.words[w] |= 1 << (slot % 64);
        self.summary[w / 64] |= 1 << (w % 64);
        self.free += 1;
    }
}
