//! The token rules of `../shared/design/logquant-spec.md` (section 1) and of the README's
//! `--kv-policy` table, written out directly as test oracles. Nothing here calls the crate:
//! the tests compare the crate's `policy` and `store` against these.
#![allow(dead_code)]

/// Which positions stay in full precision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// LogQuant with window W (spec section 1).
    LogQuant { w: usize },
    /// The newest R tokens.
    Recent { r: usize },
    /// The first S tokens and the newest R.
    SinkRecent { s: usize, r: usize },
    /// Nothing but the token being decoded.
    None,
}

/// The full-precision positions of one sequence under `rule`, token by token.
#[derive(Debug, Clone)]
pub struct SpecSelection {
    rule: Rule,
    /// The spec's list `A` (ascending positions).
    a: Vec<usize>,
    /// Tokens seen.
    len: usize,
}

impl SpecSelection {
    pub fn new(rule: Rule) -> Self {
        Self {
            rule,
            a: Vec::new(),
            len: 0,
        }
    }

    /// Full-precision positions, ascending.
    pub fn positions(&self) -> &[usize] {
        &self.a
    }

    /// Admit the next `n` tokens (one: a decode step; more: a prefill or chunk) and return the
    /// positions that leave full precision, ascending.
    pub fn admit(&mut self, n: usize) -> Vec<usize> {
        let total = self.len + n;
        let mut before = self.a.clone();
        before.extend(self.len..total);
        let after: Vec<usize> = match self.rule {
            Rule::LogQuant { w } => {
                let mut a = self.a.clone();
                if n == 1 {
                    // "When token t arrives: if len(A) < 3W: A.append(t)
                    //  else: evicted = A[1:2W:2]; A = A[0:2W:2] + A[2W:3W]; A.append(t)"
                    if a.len() >= 3 * w {
                        a = log_filter(&a, w);
                    }
                    a.push(self.len);
                } else {
                    // "Prefill: A starts as [0 .. L-1] and the rule is applied eagerly while
                    //  len(A) >= 3W (A = A[0:2W:2] + A[2W:])"
                    a.extend(self.len..total);
                    while a.len() >= 3 * w {
                        a = log_filter(&a, w);
                    }
                }
                a
            }
            Rule::Recent { r } => (total.saturating_sub(r)..total).collect(),
            Rule::SinkRecent { s, r } => (0..s.min(total))
                .chain(s.max(total.saturating_sub(r))..total)
                .collect(),
            Rule::None if n == 1 => vec![total - 1],
            Rule::None => Vec::new(),
        };
        self.len = total;
        assert!(
            after.iter().all(|p| before.contains(p)),
            "the spec rule brought back an evicted position"
        );
        let evicted = before.into_iter().filter(|p| !after.contains(p)).collect();
        self.a = after;
        evicted
    }
}

/// `A[0:2W:2] + A[2W:]`: of the oldest 2W entries every other one stays, the rest stay as
/// they are.
fn log_filter(a: &[usize], w: usize) -> Vec<usize> {
    a[..2 * w]
        .iter()
        .step_by(2)
        .chain(&a[2 * w..])
        .copied()
        .collect()
}

/// The full-precision positions after a prefill of `l` tokens under LogQuant with window `w`.
pub fn logquant_prefill(l: usize, w: usize) -> Vec<usize> {
    let mut s = SpecSelection::new(Rule::LogQuant { w });
    s.admit(l);
    s.positions().to_vec()
}

/// One point of a spec test vector: when token `token` has arrived (for the first point, the
/// prefill's last token), `evicted` left full precision at that arrival and `fp` stays.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    pub token: usize,
    pub evicted: Vec<usize>,
    pub fp: Vec<usize>,
}

/// A spec test vector: window, prefill length, checkpoints. Tokens after the prefill arrive
/// one by one; those between two checkpoints evict nothing.
#[derive(Debug, Clone)]
pub struct Vector {
    pub w: usize,
    pub prefill: usize,
    pub points: Vec<Checkpoint>,
}

/// The spec's hand-computed test vectors (section 1), as printed there.
pub fn spec_vectors() -> Vec<Vector> {
    let point = |token, evicted: &[usize], fp: &[usize]| Checkpoint {
        token,
        evicted: evicted.to_vec(),
        fp: fp.to_vec(),
    };
    // "W=4, prefill L=30 -> fp=[0,16,20,22,24,25,26,27,28,29] (the other 20 quantized)".
    let fp30 = [0, 16, 20, 22, 24, 25, 26, 27, 28, 29];
    let others30: Vec<usize> = (0..30).filter(|p| !fp30.contains(p)).collect();
    assert_eq!(others30.len(), 20);
    vec![
        Vector {
            w: 4,
            prefill: 12,
            points: vec![
                point(11, &[1, 3, 5, 7], &[0, 2, 4, 6, 8, 9, 10, 11]),
                point(15, &[], &[0, 2, 4, 6, 8, 9, 10, 11, 12, 13, 14, 15]),
                point(16, &[2, 6, 9, 11], &[0, 4, 8, 10, 12, 13, 14, 15, 16]),
                point(20, &[4, 10, 13, 15], &[0, 8, 12, 14, 16, 17, 18, 19, 20]),
            ],
        },
        Vector {
            w: 4,
            prefill: 30,
            points: vec![
                point(29, &others30, &fp30),
                point(32, &[16, 22, 25, 27], &[0, 20, 24, 26, 28, 29, 30, 31, 32]),
            ],
        },
        Vector {
            w: 4,
            prefill: 3,
            points: vec![
                point(2, &[], &[0, 1, 2]),
                point(11, &[], &(0..12).collect::<Vec<_>>()),
                point(12, &[1, 3, 5, 7], &[0, 2, 4, 6, 8, 9, 10, 11, 12]),
            ],
        },
        Vector {
            w: 2,
            prefill: 1,
            points: vec![
                point(0, &[], &[0]),
                point(6, &[1, 3], &[0, 2, 4, 5, 6]),
                point(8, &[2, 5], &[0, 4, 6, 7, 8]),
                point(10, &[4, 7], &[0, 6, 8, 9, 10]),
            ],
        },
    ]
}
