//! The native and portable kernels against each other and against a plain
//! loop over each row, on chunks built to tie: distances drawn from a few
//! integers, classes of 6 to 150 samples (the native kernels' binary search
//! starts above 32 positives), infinite distances, and anchors that are
//! references.

use tch::{Device, Kind, Tensor};

use super::{native, portable, Chunk, Columns, Selection, Weighted};
use crate::labels::masks;
use crate::Distance;

struct Case {
    d: Tensor,
    row_labels: Tensor,
    col_labels: Tensor,
    columns: Columns,
    self_col: Option<i64>,
}

impl Case {
    /// A chunk holding a copy of the distances, which the native kernels overwrite.
    fn chunk(&self) -> Chunk<'_> {
        self.chunk_of(&self.d)
    }

    /// The chunk of this case's labels with a copy of the distances `d`.
    fn chunk_of(&self, d: &Tensor) -> Chunk<'_> {
        Chunk {
            d: d.copy(),
            row_labels: &self.row_labels,
            columns: &self.columns,
            self_col: self.self_col,
            distance: Distance::Squared,
            gram: None,
            near: None,
        }
    }
}

/// `rows` anchors against `cols` references with labels in `0..classes` and
/// distances in `0..levels` (so ties are everywhere), some negatives at +inf.
fn case(seed: i64, rows: i64, cols: i64, classes: i64, levels: i64, kind: Kind) -> Case {
    tch::manual_seed(seed);
    let opts = (Kind::Int64, Device::Cpu);
    let col_labels = Tensor::randint(classes, [cols], opts);
    let self_col = (seed % 2 == 0 && rows <= cols).then_some((cols - rows) / 2);
    let row_labels = match self_col {
        // Every other anchor of some cases has a label other than its own
        // column's, which makes that column one of its negatives.
        Some(c) if seed % 4 == 2 => {
            col_labels.narrow(0, c, rows) + Tensor::arange(rows, opts).remainder(2)
        }
        Some(c) => col_labels.narrow(0, c, rows).copy(),
        None => Tensor::randint(classes, [rows], opts),
    };
    let mut d = Tensor::randint(levels, [rows, cols], opts).to_kind(kind);
    if seed % 3 == 0 {
        // Only negatives: an infinite d_ap makes d_ap − d_an NaN, which the
        // losses report through their own NaN guard.
        let negative = row_labels.unsqueeze(1).ne_tensor(&col_labels.unsqueeze(0));
        let infinite = Tensor::rand([rows, cols], (Kind::Float, Device::Cpu))
            .lt(0.05)
            .logical_and(&negative);
        d = d.masked_fill(&infinite, f64::INFINITY);
    }
    Case {
        d,
        row_labels,
        columns: Columns::new(&col_labels).expect("columns"),
        col_labels,
        self_col,
    }
}

fn values<T: tch::kind::Element>(t: &Tensor) -> Vec<T> {
    let t = t.flatten(0, -1).contiguous();
    let mut out = vec![T::ZERO; t.numel()];
    t.copy_data(&mut out, t.numel());
    out
}

/// ∂value/∂d of a selection, as a dense float64 matrix, and the number of
/// active (anchor, positive) pairs.
fn dense_weights(selection: &Selection, rows: i64, cols: i64) -> Tensor {
    match selection {
        Selection::Weights(w) => w.to_kind(Kind::Double),
        Selection::Triplets {
            anchor,
            positive,
            negative,
        } => {
            let mut w = vec![0.0f64; (rows * cols) as usize];
            for ((&a, &p), &n) in anchor.iter().zip(positive).zip(negative) {
                w[(a * cols + p) as usize] += 1.0;
                w[(a * cols + n) as usize] -= 1.0;
            }
            Tensor::from_slice(&w).reshape([rows, cols])
        }
        Selection::PairWeights { .. } => panic!("semi-hard never gives pair weights"),
    }
}

/// Semi-hard by its definition, row by row: for each positive the negative
/// with the smallest distance strictly above d_ap (lowest index on ties),
/// else the largest (lowest index on ties).
fn semihard_reference(c: &Case, margin: f64) -> (f64, i64, Tensor) {
    let (rows, cols) = (c.d.size()[0], c.d.size()[1]);
    let d = values::<f64>(&c.d.to_kind(Kind::Double));
    let (rl, cl) = (values::<i64>(&c.row_labels), values::<i64>(&c.col_labels));
    let (mut value, mut count) = (0.0, 0);
    let mut w = vec![0.0f64; d.len()];
    for a in 0..rows as usize {
        let row = &d[a * cols as usize..(a + 1) * cols as usize];
        let own = c.self_col.map(|s| s as usize + a);
        let negatives: Vec<usize> = (0..row.len()).filter(|&j| cl[j] != rl[a]).collect();
        let Some(&first) = negatives.first() else {
            continue;
        };
        let largest = negatives
            .iter()
            .copied()
            .fold(first, |b, j| if row[j] > row[b] { j } else { b });
        for p in (0..row.len()).filter(|&j| cl[j] == rl[a] && Some(j) != own) {
            count += 1;
            let above = negatives.iter().copied().filter(|&j| row[j] > row[p]).fold(
                None,
                |b: Option<usize>, j| match b {
                    Some(b) if row[b] <= row[j] => Some(b),
                    _ => Some(j),
                },
            );
            let n = above.unwrap_or(largest);
            let hinge = row[p] - row[n] + margin;
            if hinge > 0.0 {
                value += hinge;
                w[a * cols as usize + p] += 1.0;
                w[a * cols as usize + n] -= 1.0;
            }
        }
    }
    (value, count, Tensor::from_slice(&w).reshape([rows, cols]))
}

fn scalar(t: &Tensor) -> f64 {
    t.to_kind(Kind::Double).double_value(&[])
}

/// Native and portable batch-all on the case's labels with distances `d`:
/// equal counts, valid and weights, and values within `tol` relative (both
/// NaN, or equal when infinite).
fn assert_batch_all_kernels_agree(c: &Case, d: &Tensor, margin: f64, tol: f64, what: &str) {
    let n = native::batch_all(&c.chunk_of(d), margin).expect("native");
    let p = portable::batch_all(&c.chunk_of(d), margin).expect("portable");
    let (nv, pv) = (scalar(&n.value), scalar(&p.value));
    assert!(
        nv == pv || (nv - pv).abs() <= tol * (1.0 + pv.abs()) || (nv.is_nan() && pv.is_nan()),
        "{what}: batch-all value {nv} vs {pv}"
    );
    assert!(
        n.count.equal(&p.count),
        "{what}: batch-all count {} vs {}",
        n.count.int64_value(&[]),
        p.count.int64_value(&[])
    );
    assert!(n.valid.equal(&p.valid), "{what}: batch-all valid");
    // Squared distance: the pair weights are twice the weights.
    if let (Selection::PairWeights { weights, .. }, Selection::Weights(w)) =
        (&n.selection, &p.selection)
    {
        assert!(weights.equal(&(w * 2.0)), "{what}: batch-all weights");
    } else {
        panic!("{what}: unexpected batch-all selections");
    }
}

fn assert_same_semihard(got: &Weighted, want: &(f64, i64, Tensor), c: &Case, what: &str) {
    let (rows, cols) = (c.d.size()[0], c.d.size()[1]);
    let value = scalar(&got.value);
    assert!(
        (value - want.0).abs() <= 1e-9 * (1.0 + want.0.abs()),
        "{what}: value {value}, want {}",
        want.0
    );
    assert_eq!(got.count.int64_value(&[]), want.1, "{what}: count");
    assert_eq!(got.valid.int64_value(&[]), want.1, "{what}: valid");
    let w = dense_weights(&got.selection, rows, cols);
    assert!(w.equal(&want.2), "{what}: selected triplets differ");
}

#[test]
fn semihard_kernels_match_the_definition_on_ties() {
    let mut cases = 0;
    for seed in 0..24 {
        for (rows, cols, classes, levels) in [
            (7, 40, 3, 3),
            (12, 60, 10, 3), // about 6 positives per anchor, as in P×K batches
            (16, 64, 5, 2),
            (9, 300, 2, 6),   // about 150 positives per anchor
            (12, 250, 2, 40), // large K with fewer ties
            (5, 9, 9, 4),     // mostly no positive
            (6, 30, 1, 5),    // no negative
        ] {
            for kind in [Kind::Float, Kind::Double] {
                let c = case(seed, rows, cols, classes, levels, kind);
                for margin in [0.0, 0.5, 2.0] {
                    let want = semihard_reference(&c, margin);
                    let what =
                        format!("seed {seed} {rows}x{cols} classes {classes} {kind:?} m {margin}");
                    let n = native::semihard(&c.chunk(), margin).expect("native");
                    assert_same_semihard(&n, &want, &c, &format!("native {what}"));
                    let p = portable::semihard(&c.chunk(), margin).expect("portable");
                    assert_same_semihard(&p, &want, &c, &format!("portable {what}"));
                    cases += 1;
                }
            }
        }
    }
    assert_eq!(cases, 24 * 7 * 2 * 3);
}

/// A margin of 0.4 ulp of 1: d_ap + m rounds down to d_ap in float32 for
/// every whole d_ap ≥ 1, while a negative at d_ap is below d_ap + m.
const SUB_ULP_MARGIN: f64 = 0.4 / (1u64 << 23) as f64;

#[test]
fn batch_all_and_hardest_kernels_agree_on_ties() {
    for seed in 0..12 {
        for (rows, cols, classes, levels) in [
            (8, 50, 3, 3),
            (12, 60, 10, 3),
            (10, 260, 2, 7),
            (4, 12, 12, 3),
        ] {
            for kind in [Kind::Double, Kind::Float] {
                let c = case(seed, rows, cols, classes, levels, kind);
                let what = format!("seed {seed} {rows}x{cols} {kind:?}");
                // Whole margins tie d_ap + m with distances, whose hinge is 0.
                for margin in [0.0, 0.5, 2.0, SUB_ULP_MARGIN] {
                    // Infinite distances make both values NaN or infinite alike;
                    // float32 sums differ in their order.
                    let tol = if kind == Kind::Float { 1e-6 } else { 1e-9 };
                    let what = format!("{what} m {margin}");
                    assert_batch_all_kernels_agree(&c, &c.d, margin, tol, &what);
                }
            }
            let c = case(seed, rows, cols, classes, levels, Kind::Double);
            let what = format!("seed {seed} {rows}x{cols}");
            let n = native::hardest(&c.chunk()).expect("native");
            let p = portable::hardest(&c.chunk()).expect("portable");
            assert!(n.valid.equal(&p.valid), "{what}: hardest valid");
            let valid = &n.valid;
            for (a, b, name) in [
                (&n.positive, &p.positive, "positive"),
                (&n.negative, &p.negative, "negative"),
            ] {
                let (a, b) = (a.masked_select(valid), b.masked_select(valid));
                assert!(a.equal(&b), "{what}: hardest {name}");
            }
        }
    }
}

/// Positives at an infinite distance (overflowing inputs, whose loss the NaN
/// guard reports) sort among the +inf that pads the other columns: the
/// portable batch-all still gives their weights to their own columns, as the
/// native kernel does.
#[test]
fn batch_all_kernels_agree_on_infinite_positives() {
    for seed in 0..12 {
        let c = case(seed, 10, 60, 4, 5, Kind::Double);
        let (same, _) = masks(&c.row_labels, &c.col_labels, None).unwrap();
        let infinite = Tensor::rand([10, 60], (Kind::Float, Device::Cpu))
            .lt(0.3)
            .logical_and(&same);
        let d = c.d.masked_fill(&infinite, f64::INFINITY);
        assert_batch_all_kernels_agree(&c, &d, 0.5, 0.0, &format!("seed {seed}"));
    }
}

/// A NaN distance to a negative (NaN inputs, whose loss the NaN guard
/// reports) is below no d_ap + m: neither kernel counts it as active or
/// gives it, or its positives, a weight.
#[test]
fn batch_all_kernels_agree_on_nan_negatives() {
    for seed in 0..12 {
        for kind in [Kind::Double, Kind::Float] {
            let c = case(seed, 10, 60, 4, 5, kind);
            let (_, different) = masks(&c.row_labels, &c.col_labels, None).unwrap();
            let nan = Tensor::rand([10, 60], (Kind::Float, Device::Cpu))
                .lt(0.3)
                .logical_and(&different);
            let d = c.d.masked_fill(&nan, f64::NAN);
            assert_batch_all_kernels_agree(&c, &d, 0.5, 1e-6, &format!("seed {seed} {kind:?}"));
        }
    }
}

#[test]
fn native_kernels_refuse_other_dtypes() {
    let c = case(1, 4, 8, 2, 3, Kind::Half);
    assert!(native::semihard(&c.chunk(), 0.1).is_err());
    assert!(native::batch_all(&c.chunk(), 0.1).is_err());
    assert!(native::hardest(&c.chunk()).is_err());
}

/// Square roots rounded to nearest, as IEEE 754 (and Rust) define them;
/// libtorch's CPU sqrt may be an ulp off. A float32 value's square root in
/// float64, rounded to float32, is rounded correctly.
fn rounded_sqrt(t: &Tensor) -> Tensor {
    let v: Vec<f64> = values::<f64>(&t.to_kind(Kind::Double))
        .into_iter()
        .map(f64::sqrt)
        .collect();
    Tensor::from_slice(&v).reshape(t.size()).to_kind(t.kind())
}

/// The native kernels given Gram products and norms give exactly what they
/// give on the distances that libtorch computes from those products in the
/// same order of operations (`Side::pairwise`'s), for every distance,
/// both dtypes, rows with few positives (the vectorised passes) and with
/// many (the buckets), and anchors that are references.
#[test]
fn native_kernels_on_gram_products_match_them_on_distances() {
    use super::Gram;
    use crate::distance::Side;

    for (seed, (rows, cols, classes)) in [(40, 200, 25), (24, 300, 3), (33, 97, 40)]
        .into_iter()
        .enumerate()
    {
        for kind in [Kind::Float, Kind::Double] {
            for distance in [Distance::Euclidean, Distance::Squared, Distance::Cosine] {
                tch::manual_seed(seed as i64);
                let opts = (kind, Device::Cpu);
                let y = Tensor::randn([cols, 16], opts) + 3.0;
                let self_col = (seed != 1).then_some(7);
                let x = match self_col {
                    Some(c) => y.narrow(0, c, rows).copy(),
                    None => Tensor::randn([rows, 16], opts),
                };
                let col_labels = Tensor::randint(classes, [cols], (Kind::Int64, Device::Cpu));
                let row_labels = match self_col {
                    Some(c) => col_labels.narrow(0, c, rows).copy(),
                    None => Tensor::randint(classes, [rows], (Kind::Int64, Device::Cpu)),
                };
                let columns = Columns::new(&col_labels).expect("columns");
                let (sx, sy) =
                    Side::pair(distance, &x, Some(std::slice::from_ref(&y))).expect("sides");
                let g = Tensor::empty([rows, cols], opts);
                sx.gram_into(&sy, &g).expect("gram");
                // The distances from the same products by libtorch's
                // elementwise operations, each rounded as in the kernels.
                let d = match distance {
                    Distance::Cosine => g.neg() + 1.0,
                    _ => {
                        let s = (sy.norms().unsqueeze(0) + &g * -2.0 + sx.norms().unsqueeze(1))
                            .clamp_min(0.0);
                        if distance == Distance::Euclidean {
                            rounded_sqrt(&s)
                        } else {
                            s
                        }
                    }
                };
                let chunk = |gram: bool| Chunk {
                    d: if gram { g.copy() } else { d.copy() },
                    row_labels: &row_labels,
                    columns: &columns,
                    self_col,
                    distance,
                    gram: gram.then_some(Gram {
                        row_norms: sx.norms(),
                        col_norms: sy.norms(),
                    }),
                    near: None,
                };
                let what = format!("seed {seed} {kind:?} {distance:?}");
                let (a, b) = (
                    kernel_outputs(&|| chunk(true)),
                    kernel_outputs(&|| chunk(false)),
                );
                for ((name, a), (_, b)) in a.iter().zip(&b) {
                    assert!(a.equal(b), "{what}: {name}");
                }
            }
        }
    }
}

/// Everything the three native kernels return for fresh copies of a chunk,
/// named, at margins 0 and 0.3.
fn kernel_outputs<'a>(c: &dyn Fn() -> Chunk<'a>) -> Vec<(String, Tensor)> {
    let mut out: Vec<(String, Tensor)> = vec![];
    let mut put =
        |name: &str, margin: f64, t: Tensor| out.push((format!("{name} (m {margin})"), t));
    for margin in [0.0, 0.3] {
        let w = native::batch_all(&c(), margin).expect("batch-all");
        put("batch-all value", margin, w.value);
        put("batch-all count", margin, w.count);
        put("batch-all valid", margin, w.valid);
        match w.selection {
            Selection::PairWeights {
                weights,
                row_sum,
                col_sum,
                near,
            } => {
                put("batch-all weights", margin, weights);
                put("batch-all row sums", margin, row_sum);
                put("batch-all column sums", margin, col_sum);
                put(
                    "batch-all near anchors",
                    margin,
                    Tensor::from_slice(&near.anchor),
                );
                put(
                    "batch-all near columns",
                    margin,
                    Tensor::from_slice(&near.reference),
                );
                put(
                    "batch-all near weights",
                    margin,
                    Tensor::from_slice(&near.weight),
                );
            }
            _ => panic!("batch-all gives pair weights"),
        }
        let s = native::semihard(&c(), margin).expect("semi-hard");
        put("semi-hard value", margin, s.value);
        put("semi-hard count", margin, s.count);
        put("semi-hard valid", margin, s.valid);
        match s.selection {
            Selection::Triplets {
                anchor,
                positive,
                negative,
            } => {
                put("semi-hard anchors", margin, Tensor::from_slice(&anchor));
                put("semi-hard positives", margin, Tensor::from_slice(&positive));
                put("semi-hard negatives", margin, Tensor::from_slice(&negative));
            }
            _ => panic!("native semi-hard gives triplets"),
        }
    }
    let h = native::hardest(&c()).expect("hardest");
    put("hardest positives", 0.0, h.positive);
    put("hardest negatives", 0.0, h.negative);
    put("hardest valid", 0.0, h.valid);
    out
}

/// Every vector width gives the same bits: the kernels run with AVX-512,
/// AVX2 and the baseline allowed in turn (as far as the CPU has them) on
/// Gram products of every distance, both dtypes, few and many positives,
/// and so do the half-matrix kernels on the same samples.
/// Other tests running meanwhile see a lowered ceiling too, which must not
/// change their results either.
#[test]
fn every_vector_width_gives_the_same_bits() {
    use super::native::simd::CEILING;
    use super::Gram;
    use crate::distance::Side;
    use std::sync::atomic::Ordering;

    for (seed, (rows, cols, classes)) in [(40, 300, 30), (20, 200, 3)].into_iter().enumerate() {
        for kind in [Kind::Float, Kind::Double] {
            for distance in [Distance::Euclidean, Distance::Squared, Distance::Cosine] {
                tch::manual_seed(seed as i64);
                let opts = (kind, Device::Cpu);
                let y = Tensor::randn([cols, 24], opts);
                let col_labels = Tensor::randint(classes, [cols], (Kind::Int64, Device::Cpu));
                let row_labels = col_labels.narrow(0, 5, rows).copy();
                let columns = Columns::new(&col_labels).expect("columns");
                let (sx, sy) = Side::pair(
                    distance,
                    &y.narrow(0, 5, rows),
                    Some(std::slice::from_ref(&y)),
                )
                .expect("sides");
                let g = Tensor::empty([rows, cols], opts);
                sx.gram_into(&sy, &g).expect("gram");
                let chunk = || Chunk {
                    d: g.copy(),
                    row_labels: &row_labels,
                    columns: &columns,
                    self_col: Some(5),
                    distance,
                    gram: Some(Gram {
                        row_norms: sx.norms(),
                        col_norms: sy.norms(),
                    }),
                    near: None,
                };
                // The half-matrix kernels of the references against themselves
                // (batch-all and semi-hard only with the smaller classes).
                let (sw, _) = Side::pair(distance, &y, None).expect("sides");
                let within = || {
                    let (p, n) = (sw.points(), sw.norms());
                    let h = super::hardest_within(p, n, &columns, distance, (7, None))
                        .expect("half matrix");
                    let mut out = vec![
                        ("within positive".to_string(), h.positive),
                        ("within negative".to_string(), h.negative),
                        ("within valid".to_string(), h.valid),
                    ];
                    let all = super::batch_all_within(
                        (p, n, p),
                        &columns,
                        (distance, 0.3),
                        (7, None),
                        true,
                    );
                    if let Some(a) = all.expect("half-matrix batch-all") {
                        out.extend([
                            ("within batch-all value".to_string(), a.value),
                            ("within batch-all count".to_string(), a.count),
                            ("within batch-all gradient".to_string(), a.grad),
                        ]);
                    }
                    let semihard =
                        super::semihard_within(p, n, &columns, (distance, 0.3), (7, None));
                    if let Some(w) = semihard.expect("half-matrix semi-hard") {
                        out.push(("within semi-hard value".to_string(), w.value));
                        if let Selection::Triplets { negative, .. } = w.selection {
                            out.push((
                                "within semi-hard negatives".to_string(),
                                Tensor::from_slice(&negative),
                            ));
                        }
                    }
                    out
                };
                let mut results = vec![];
                for ceiling in [2, 1, 0] {
                    CEILING.store(ceiling, Ordering::Relaxed);
                    let mut outputs = kernel_outputs(&chunk);
                    outputs.extend(within());
                    results.push(outputs);
                }
                CEILING.store(2, Ordering::Relaxed);
                for (level, got) in results.iter().enumerate().skip(1) {
                    for ((name, a), (_, b)) in got.iter().zip(&results[0]) {
                        assert!(
                            a.equal(b),
                            "seed {seed} {kind:?} {distance:?}: {name} differs at ceiling {}",
                            2 - level
                        );
                    }
                }
            }
        }
    }
}

/// Batch-hard of a batch against itself from half its Gram matrix picks what
/// the row kernel picks from the whole matrix that those products make
/// symmetric (each product serves both of its pairs), for every distance,
/// both dtypes and chunks of 1 to all anchors, on points of a small grid,
/// whose many equal distances and duplicates test the lowest column on
/// ties, with classes of one sample (no positive) and a single class (no
/// negative).
#[test]
fn hardest_within_picks_what_the_whole_matrix_gives() {
    use super::{hardest_within, Gram};
    use crate::distance::Side;

    let mut cases = 0;
    for (seed, (n, d, classes)) in [(40, 2, 5), (70, 2, 70), (33, 3, 1), (50, 3, 4), (97, 5, 9)]
        .into_iter()
        .enumerate()
    {
        for kind in [Kind::Float, Kind::Double] {
            for distance in [Distance::Euclidean, Distance::Squared, Distance::Cosine] {
                tch::manual_seed(seed as i64);
                let x = Tensor::randint(4, [n, d], (kind, Device::Cpu)) - 1.5;
                let labels = Tensor::randint(classes, [n], (Kind::Int64, Device::Cpu));
                let columns = Columns::new(&labels).expect("columns");
                let (sx, _) = Side::pair(distance, &x, None).expect("sides");
                let p = sx.points();
                for step in [1, 5, 16, 17, 33, n] {
                    // Each chunk's products with the samples from its first
                    // on; those with the later chunks serve their rows too.
                    let g = Tensor::zeros([n, n], (kind, Device::Cpu));
                    for s in (0..n).step_by(step as usize) {
                        let len = step.min(n - s);
                        let block = p.narrow(0, s, len).mm(&p.narrow(0, s, n - s).tr());
                        g.narrow(0, s, len).narrow(1, s, n - s).copy_(&block);
                        let later = block.narrow(1, len, n - s - len).tr();
                        g.narrow(0, s + len, n - s - len)
                            .narrow(1, s, len)
                            .copy_(&later);
                    }
                    let want = native::hardest(&Chunk {
                        d: g,
                        row_labels: &labels,
                        columns: &columns,
                        self_col: Some(0),
                        distance,
                        gram: Some(Gram {
                            row_norms: sx.norms(),
                            col_norms: sx.norms(),
                        }),
                        near: None,
                    })
                    .expect("whole matrix");
                    let what = format!("seed {seed} {kind:?} {distance:?} step {step}");
                    let got = hardest_within(p, sx.norms(), &columns, distance, (step, None))
                        .expect("half matrix");
                    assert!(got.valid.equal(&want.valid), "{what}: valid");
                    for (a, b, name) in [
                        (&got.positive, &want.positive, "positive"),
                        (&got.negative, &want.negative, "negative"),
                    ] {
                        let (a, b) = (a.masked_select(&want.valid), b.masked_select(&want.valid));
                        assert!(a.equal(&b), "{what}: {name}");
                    }
                    cases += 1;
                }
            }
        }
    }
    assert_eq!(cases, 5 * 2 * 3 * 6);
}

/// A positive at a NaN distance (NaN inputs, whose loss the NaN guard
/// reports) among the references below a chunk: the half-matrix batch-hard
/// continues the row's scan from it, as one scan over the whole row does.
#[test]
fn hardest_within_keeps_the_scan_order_past_a_nan_positive() {
    use super::{hardest_within, Gram};
    use crate::distance::Side;

    let x = Tensor::from_slice(&[1.0f64, 0.0, 1.0, 0.1, f64::NAN, 0.0, -1.0, 0.0, 0.0, 1.0])
        .reshape([5, 2]);
    let labels = Tensor::from_slice(&[0i64, 0, 0, 0, 1]);
    let columns = Columns::new(&labels).expect("columns");
    let (sx, _) = Side::pair(Distance::Cosine, &x, None).expect("sides");
    let g = Tensor::empty([5, 5], (Kind::Double, Device::Cpu));
    sx.gram_into(&sx, &g).expect("gram");
    let want = native::hardest(&Chunk {
        d: g,
        row_labels: &labels,
        columns: &columns,
        self_col: Some(0),
        distance: Distance::Cosine,
        gram: Some(Gram {
            row_norms: sx.norms(),
            col_norms: sx.norms(),
        }),
        near: None,
    })
    .expect("whole matrix");
    for step in [1, 2, 5] {
        let got = hardest_within(
            sx.points(),
            sx.norms(),
            &columns,
            Distance::Cosine,
            (step, None),
        )
        .expect("half matrix");
        assert!(got.valid.equal(&want.valid), "step {step}: valid");
        for (a, b, name) in [
            (&got.positive, &want.positive, "positive"),
            (&got.negative, &want.negative, "negative"),
        ] {
            let (a, b) = (a.masked_select(&want.valid), b.masked_select(&want.valid));
            assert!(a.equal(&b), "step {step}: {name}");
        }
    }
}
