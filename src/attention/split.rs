//! Decode attention over long contexts split across the threads ("split-K", as vLLM's paged
//! attention v2 on the GPU): a step with fewer decode queries than the CPU has threads (batch
//! 1 above all) would otherwise read each query's whole context on one core, at one core's
//! share of the memory bandwidth. Each long context's blocks are cut into parts computed in
//! parallel; each part gives, per head, its largest score, the sum of its exponentials and its
//! V rows weighted by them (not yet divided by the sum), and [`merge`] combines the parts.

use std::ops::Range;

/// Fewest keys in a part: below, a part's fixed costs (the merge, a work item) outweigh what
/// the second core's bandwidth brings.
pub const MIN_PART_KEYS: usize = 256;

/// How many parts a decode query that sees `keys` keys is cut into, in a step of `items` work
/// items over `threads` threads: enough for two items per thread, whole parts of at least
/// [`MIN_PART_KEYS`], and none where the step already has work for every thread twice.
pub fn parts(keys: usize, items: usize, threads: usize) -> usize {
    if items == 0 || items >= 2 * threads {
        return 1;
    }
    (2 * threads)
        .div_ceil(items)
        .min(keys / MIN_PART_KEYS)
        .max(1)
}

/// `nb` blocks cut into `parts` consecutive runs, as even as whole blocks allow (the first
/// ones one longer), none empty where `parts <= nb`.
pub fn ranges(nb: usize, parts: usize) -> impl Iterator<Item = Range<usize>> {
    let (each, longer) = (nb / parts, nb % parts);
    (0..parts).map(move |p| {
        let start = p * each + p.min(longer);
        start..start + each + usize::from(p < longer)
    })
}

/// Writes into `out` (`[heads * d]`) the attention of one query from its parts: `ml` holds
/// each part's `(max score, sum of exp(score - max))` per head (`[parts * heads]`), `acc` its
/// weighted V rows (`[parts * heads * d]`).
pub fn merge(ml: &[(f32, f32)], acc: &[f32], (heads, d): (usize, usize), out: &mut [f32]) {
    let parts = ml.len() / heads;
    debug_assert!(acc.len() == parts * heads * d && out.len() == heads * d);
    for h in 0..heads {
        let max = (0..parts)
            .map(|p| ml[p * heads + h].0)
            .fold(f32::NEG_INFINITY, f32::max);
        let o = &mut out[h * d..][..d];
        o.fill(0.0);
        let mut sum = 0.0;
        for p in 0..parts {
            let (m, l) = ml[p * heads + h];
            let w = (m - max).exp();
            sum += w * l;
            for (o, &a) in o.iter_mut().zip(&acc[(p * heads + h) * d..][..d]) {
                *o += w * a;
            }
        }
        let inv = 1.0 / sum;
        o.iter_mut().for_each(|x| *x *= inv);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_follow_the_threads_and_the_context() {
        // Batch 1 on two threads: four parts where the context allows them.
        assert_eq!(parts(8192, 1, 2), 4);
        assert_eq!(parts(600, 1, 2), 2);
        assert_eq!(parts(300, 1, 2), 1);
        assert_eq!(parts(100, 1, 2), 1);
        // Three items on two threads: two parts each; four or more: none.
        assert_eq!(parts(8192, 3, 2), 2);
        assert_eq!(parts(8192, 4, 2), 1);
        assert_eq!(parts(8192, 1, 16), 32);
        assert_eq!(parts(8192, 0, 2), 1);
    }

    #[test]
    fn ranges_cover_the_blocks_in_order() {
        for (nb, p) in [(10, 3), (4, 4), (33, 2), (7, 1)] {
            let r: Vec<_> = ranges(nb, p).collect();
            assert_eq!(r.len(), p);
            assert_eq!(r[0].start, 0);
            assert_eq!(r[p - 1].end, nb);
            assert!(r.windows(2).all(|w| w[0].end == w[1].start));
            let lens: Vec<usize> = r.iter().map(|x| x.len()).collect();
            assert!(
                lens.iter().max().unwrap() - lens.iter().min().unwrap() <= 1,
                "{lens:?}"
            );
        }
    }

    /// Parts of one softmax merge to the softmax over all of it.
    #[test]
    fn merge_equals_the_whole_softmax() {
        let (heads, d) = (2, 3);
        // Scores and value rows of 7 keys, per head.
        let scores = [
            [0.3f32, -1.0, 2.0, 0.5, 0.0, 1.5, -0.2],
            [5.0, 4.0, -3.0, 0.1, 2.2, 2.1, 0.0],
        ];
        let v: Vec<[f32; 3]> = (0..7)
            .map(|j| [j as f32, 1.0 - j as f32, 0.5 * j as f32])
            .collect();
        let whole = |h: usize| -> Vec<f32> {
            let m = scores[h].iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let e: Vec<f32> = scores[h].iter().map(|s| (s - m).exp()).collect();
            let z: f32 = e.iter().sum();
            (0..d)
                .map(|c| e.iter().zip(&v).map(|(p, r)| p * r[c]).sum::<f32>() / z)
                .collect()
        };
        let cuts = [0..2, 2..3, 3..7];
        let (mut ml, mut acc) = (Vec::new(), Vec::new());
        for r in &cuts {
            for row in &scores {
                let s = &row[r.clone()];
                let m = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let e: Vec<f32> = s.iter().map(|x| (x - m).exp()).collect();
                ml.push((m, e.iter().sum()));
                for c in 0..d {
                    acc.push(e.iter().zip(&v[r.clone()]).map(|(p, row)| p * row[c]).sum());
                }
            }
        }
        let mut out = vec![f32::NAN; heads * d];
        merge(&ml, &acc, (heads, d), &mut out);
        for h in 0..heads {
            for (got, want) in out[h * d..][..d].iter().zip(whole(h)) {
                assert!((got - want).abs() < 1e-5, "head {h}: {got} vs {want}");
            }
        }
    }
}
