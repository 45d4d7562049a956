//! Which tokens stay in full precision. A [`Selection`] keeps the ordered list of full-precision
//! positions; [`Selection::admit`] adds the newest tokens and says which entries leave.
//!
//! The selection depends only on positions, so every layer, head and batch row of equal length
//! makes the same choice.
//!
//! This file holds the rules ([`Policy`], [`Selection::admit`]) and depends on nothing else in
//! the crate; the user-facing side of a policy (its name [`PolicyKind`](crate::config::PolicyKind),
//! which is also the flag value, the TOML value, the `--configs` name and the CLI help, its
//! parameters and their checks, its budget and description, and the mapping to a [`Policy`])
//! lives in `config.rs`. Adding one is a variant on both sides and the match arms the compiler
//! then asks for, plus its tests.

/// The rule, with its parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// LogQuant, Algorithm 1 (spec section 1), window W.
    LogQuant { window: usize },
    /// The newest `recent` tokens.
    Recent { recent: usize },
    /// The first `sink` tokens and the newest `recent` tokens.
    SinkRecent { sink: usize, recent: usize },
    /// Nothing but the token being decoded.
    None,
}

/// The full-precision positions of one sequence, oldest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selection {
    policy: Policy,
    positions: Vec<usize>,
    next_position: usize,
}

impl Selection {
    pub fn new(policy: Policy) -> Self {
        Self {
            policy,
            positions: Vec::new(),
            next_position: 0,
        }
    }

    /// Full-precision positions, oldest first.
    pub fn positions(&self) -> &[usize] {
        &self.positions
    }

    /// Tokens seen.
    pub fn len(&self) -> usize {
        self.next_position
    }

    pub fn is_empty(&self) -> bool {
        self.next_position == 0
    }

    /// Admit the next `n` tokens. Returns the indices, into the list `positions() + new`, of the
    /// entries that leave full precision, ascending (so in position order).
    ///
    /// One token is a decode step: the policy compresses first, then appends. Several tokens are
    /// a prefill (or a chunk): all are appended and the rule is applied eagerly.
    pub fn admit(&mut self, n: usize) -> Vec<usize> {
        // (position, index into the extended list)
        let mut list: Vec<(usize, usize)> = self.positions.iter().copied().zip(0..).collect();
        let old = list.len();
        let new: Vec<(usize, usize)> = (0..n).map(|i| (self.next_position + i, old + i)).collect();
        self.next_position += n;
        let mut evicted = Vec::new();
        match self.policy {
            Policy::LogQuant { window } => {
                let w = window;
                if n == 1 {
                    if list.len() >= 3 * w {
                        log_compress(&mut list, w, &mut evicted);
                    }
                    list.extend(new);
                } else {
                    list.extend(new);
                    while list.len() >= 3 * w {
                        log_compress(&mut list, w, &mut evicted);
                    }
                }
            }
            Policy::Recent { recent } => {
                list.extend(new);
                let excess = list.len().saturating_sub(recent);
                evicted.extend(list.drain(..excess).map(|(_, i)| i));
            }
            Policy::SinkRecent { sink, recent } => {
                list.extend(new);
                // Sink tokens are the first `sink` positions of the sequence.
                let sinks = list.iter().take_while(|(p, _)| *p < sink).count();
                let excess = list.len().saturating_sub(sinks + recent);
                evicted.extend(list.drain(sinks..sinks + excess).map(|(_, i)| i));
            }
            Policy::None => {
                evicted.extend(list.drain(..).map(|(_, i)| i));
                if n == 1 {
                    list.extend(new);
                } else {
                    evicted.extend(new.into_iter().map(|(_, i)| i));
                }
            }
        }
        self.positions = list.into_iter().map(|(p, _)| p).collect();
        evicted.sort_unstable();
        evicted
    }
}

/// One LogQuant compression: of the oldest 2W entries keep every other one (starting with the
/// first), keep the newest W as they are. Exactly W entries leave.
fn log_compress(list: &mut Vec<(usize, usize)>, w: usize, evicted: &mut Vec<usize>) {
    let mut kept = Vec::with_capacity(list.len() - w);
    for (i, entry) in list.iter().enumerate() {
        if i < 2 * w && i % 2 == 1 {
            evicted.push(entry.1);
        } else {
            kept.push(*entry);
        }
    }
    *list = kept;
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// Positions that left at the admission, given the list before it.
    fn admit_positions(sel: &mut Selection, n: usize) -> Vec<usize> {
        let mut before: Vec<usize> = sel.positions().to_vec();
        before.extend(sel.len()..sel.len() + n);
        sel.admit(n).into_iter().map(|i| before[i]).collect()
    }

    fn logquant(w: usize) -> Selection {
        Selection::new(Policy::LogQuant { window: w })
    }

    #[test]
    fn spec_vectors_w4_prefill_12() {
        let mut s = logquant(4);
        assert_eq!(admit_positions(&mut s, 12), vec![1, 3, 5, 7]);
        assert_eq!(s.positions(), &[0, 2, 4, 6, 8, 9, 10, 11]);
        for _ in 12..16 {
            assert!(admit_positions(&mut s, 1).is_empty());
        }
        assert_eq!(s.positions().len(), 12);
        assert_eq!(admit_positions(&mut s, 1), vec![2, 6, 9, 11]);
        assert_eq!(s.positions(), &[0, 4, 8, 10, 12, 13, 14, 15, 16]);
        for _ in 17..20 {
            assert!(admit_positions(&mut s, 1).is_empty());
        }
        assert_eq!(admit_positions(&mut s, 1), vec![4, 10, 13, 15]);
        assert_eq!(s.positions(), &[0, 8, 12, 14, 16, 17, 18, 19, 20]);
    }

    #[test]
    fn spec_vectors_w4_prefill_30() {
        let mut s = logquant(4);
        assert_eq!(admit_positions(&mut s, 30).len(), 20);
        assert_eq!(s.positions(), &[0, 16, 20, 22, 24, 25, 26, 27, 28, 29]);
        admit_positions(&mut s, 1);
        admit_positions(&mut s, 1);
        assert_eq!(admit_positions(&mut s, 1), vec![16, 22, 25, 27]);
        assert_eq!(s.positions(), &[0, 20, 24, 26, 28, 29, 30, 31, 32]);
    }

    #[test]
    fn spec_vectors_w4_prefill_3() {
        let mut s = logquant(4);
        assert!(admit_positions(&mut s, 3).is_empty());
        assert_eq!(s.positions(), &[0, 1, 2]);
        for _ in 3..12 {
            assert!(admit_positions(&mut s, 1).is_empty());
        }
        assert_eq!(s.positions(), (0..12).collect::<Vec<_>>().as_slice());
        assert_eq!(admit_positions(&mut s, 1), vec![1, 3, 5, 7]);
        assert_eq!(s.positions(), &[0, 2, 4, 6, 8, 9, 10, 11, 12]);
    }

    #[test]
    fn spec_vectors_w2_prefill_1() {
        let mut s = logquant(2);
        admit_positions(&mut s, 1);
        for _ in 1..6 {
            assert!(admit_positions(&mut s, 1).is_empty());
        }
        assert_eq!(admit_positions(&mut s, 1), vec![1, 3]);
        assert_eq!(s.positions(), &[0, 2, 4, 5, 6]);
        admit_positions(&mut s, 1);
        assert_eq!(admit_positions(&mut s, 1), vec![2, 5]);
        assert_eq!(s.positions(), &[0, 4, 6, 7, 8]);
        admit_positions(&mut s, 1);
        assert_eq!(admit_positions(&mut s, 1), vec![4, 7]);
        assert_eq!(s.positions(), &[0, 6, 8, 9, 10]);
    }

    #[test]
    fn recent_and_sink_recent_keep_their_budgets() {
        let mut s = Selection::new(Policy::Recent { recent: 3 });
        assert_eq!(admit_positions(&mut s, 5), vec![0, 1]);
        assert_eq!(admit_positions(&mut s, 1), vec![2]);
        assert_eq!(s.positions(), &[3, 4, 5]);

        let mut s = Selection::new(Policy::SinkRecent { sink: 2, recent: 3 });
        assert_eq!(admit_positions(&mut s, 7), vec![2, 3]);
        assert_eq!(s.positions(), &[0, 1, 4, 5, 6]);
        assert_eq!(admit_positions(&mut s, 1), vec![4]);
        assert_eq!(s.positions(), &[0, 1, 5, 6, 7]);
    }

    #[test]
    fn none_keeps_only_the_token_being_decoded() {
        let mut s = Selection::new(Policy::None);
        assert_eq!(admit_positions(&mut s, 4), vec![0, 1, 2, 3]);
        assert!(s.positions().is_empty());
        assert!(admit_positions(&mut s, 1).is_empty());
        assert_eq!(s.positions(), &[4]);
        assert_eq!(admit_positions(&mut s, 1), vec![4]);
        assert_eq!(s.positions(), &[5]);
    }

    /// The spec's eager prefill rule, written independently: A = [0..L), then
    /// `A = A[0:2W:2] + A[2W:]` while len(A) >= 3W.
    fn eager_prefill(l: usize, w: usize) -> Vec<usize> {
        let mut a: Vec<usize> = (0..l).collect();
        while a.len() >= 3 * w {
            let mut next: Vec<usize> = a[..2 * w].iter().step_by(2).copied().collect();
            next.extend_from_slice(&a[2 * w..]);
            a = next;
        }
        a
    }

    #[test]
    fn logquant_properties_over_random_windows_and_lengths() {
        let mut rng = ChaCha8Rng::seed_from_u64(0x9E37_79B9_7F4A_7C15);
        for _ in 0..300 {
            let w = rng.random_range(1..=50);
            let prefill = rng.random_range(1..=8 * w);
            let steps = rng.random_range(0..10 * w);
            let mut s = logquant(w);
            let evicted = s.admit(prefill);
            assert_eq!(
                s.positions(),
                eager_prefill(prefill, w).as_slice(),
                "W={w} L={prefill}"
            );
            assert_eq!(evicted.len() % w, 0);
            assert_eq!(prefill - evicted.len(), s.positions().len());
            let mut compressed = prefill >= 3 * w;
            for _ in 0..steps {
                let before = s.positions().len();
                let evicted = s.admit(1);
                assert!(
                    evicted.is_empty() || evicted.len() == w,
                    "W={w}: {evicted:?}"
                );
                compressed |= !evicted.is_empty();
                let n = s.positions().len();
                assert_eq!(n, before + 1 - evicted.len());
                assert!(n <= 3 * w, "W={w}: {n} full-precision tokens");
                if compressed && !evicted.is_empty() {
                    assert_eq!(n, 2 * w + 1);
                }
                if compressed {
                    assert!((2 * w..=3 * w).contains(&n), "W={w}: {n}");
                } else {
                    assert_eq!(n, s.len(), "all tokens stay while fewer than 3W");
                }
                assert_eq!(s.positions()[0], 0, "position 0 is never evicted");
                assert!(s.positions().windows(2).all(|p| p[0] < p[1]));
            }
            // After the first decode-time compression the count stays in [2W+1, 3W].
            if steps > 3 * w {
                let n = s.positions().len();
                assert!((2 * w + 1..=3 * w).contains(&n), "W={w}: {n}");
            }
        }
    }
}
