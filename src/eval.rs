//! Sample-quality metrics between generated and real images, in pixel space or in a feature
//! space: MMD^2 with Gaussian kernels, KID (unbiased MMD^2 with the cubic polynomial kernel,
//! averaged over subsets), and the k-nearest-neighbour metrics precision and recall
//! (Kynkäänniemi et al. 2019) and density and coverage (Naeem et al. 2020).
//!
//! Sets are row-major [n, d] matrices of f32. The CPU computes everything here: evaluation
//! sets are small (hundreds to a few thousand images) and this keeps the reference simple.

use serde::Serialize;

mod report;
pub use report::{evaluate, EvalRow, EvalSetup, Evaluation};

/// Metrics of one comparison.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct Metrics {
    pub mmd2: f64,
    pub kid: f64,
    pub kid_std: f64,
    pub precision: f64,
    pub recall: f64,
    pub density: f64,
    pub coverage: f64,
}

fn sq_dists(a: &[f32], b: &[f32], d: usize) -> Vec<f32> {
    let (n, m) = (a.len() / d, b.len() / d);
    let mut out = vec![0f32; n * m];
    for i in 0..n {
        let ai = &a[i * d..(i + 1) * d];
        for j in 0..m {
            let bj = &b[j * d..(j + 1) * d];
            let mut s = 0f32;
            for k in 0..d {
                let e = ai[k] - bj[k];
                s += e * e;
            }
            out[i * m + j] = s;
        }
    }
    out
}

/// Biased MMD^2 with a sum of Gaussian kernels.
pub fn mmd2(x: &[f32], y: &[f32], d: usize, sigmas: &[f32]) -> f64 {
    let k = |dd: f32| -> f64 {
        sigmas
            .iter()
            .map(|s| (-(dd as f64) / (2.0 * (*s as f64).powi(2))).exp())
            .sum()
    };
    let mean = |a: &[f32], b: &[f32]| -> f64 {
        let dd = sq_dists(a, b, d);
        dd.iter().map(|&v| k(v)).sum::<f64>() / dd.len() as f64
    };
    mean(x, x) + mean(y, y) - 2.0 * mean(x, y)
}

/// KID: unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3, mean and standard deviation over
/// `subsets` random subsets of `size` from each set.
pub fn kid(
    x: &[f32],
    y: &[f32],
    d: usize,
    subsets: usize,
    size: usize,
    rng: &mut crate::rng::HostRng,
) -> (f64, f64) {
    let (n, m) = (x.len() / d, y.len() / d);
    let size = size.min(n).min(m);
    if size < 2 {
        return (f64::NAN, f64::NAN);
    }
    let k = |a: &[f32], b: &[f32]| -> f64 {
        (a.iter()
            .zip(b)
            .map(|(p, q)| (*p as f64) * (*q as f64))
            .sum::<f64>()
            / d as f64
            + 1.0)
            .powi(3)
    };
    let mut vals = Vec::with_capacity(subsets);
    for _ in 0..subsets.max(1) {
        let pick = |total: usize, rng: &mut crate::rng::HostRng| -> Vec<usize> {
            let mut idx: Vec<usize> = (0..total).collect();
            rng.shuffle(&mut idx);
            idx.truncate(size);
            idx
        };
        let (ix, iy) = (pick(n, rng), pick(m, rng));
        let row = |v: &[f32], i: usize| -> Vec<f32> { v[i * d..(i + 1) * d].to_vec() };
        let xs: Vec<Vec<f32>> = ix.iter().map(|&i| row(x, i)).collect();
        let ys: Vec<Vec<f32>> = iy.iter().map(|&i| row(y, i)).collect();
        let (mut kxx, mut kyy, mut kxy) = (0.0, 0.0, 0.0);
        for i in 0..size {
            for j in 0..size {
                if i != j {
                    kxx += k(&xs[i], &xs[j]);
                    kyy += k(&ys[i], &ys[j]);
                }
                kxy += k(&xs[i], &ys[j]);
            }
        }
        let s = size as f64;
        vals.push(kxx / (s * (s - 1.0)) + kyy / (s * (s - 1.0)) - 2.0 * kxy / (s * s));
    }
    let mean = vals.iter().sum::<f64>() / vals.len() as f64;
    let var = vals.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / vals.len() as f64;
    (mean, var.sqrt())
}

/// Distance of each row of `a` to its k-th nearest other row of `a`.
fn knn_radii(a: &[f32], d: usize, k: usize) -> Vec<f32> {
    let n = a.len() / d;
    let dd = sq_dists(a, a, d);
    (0..n)
        .map(|i| {
            let mut row: Vec<f32> = (0..n).filter(|&j| j != i).map(|j| dd[i * n + j]).collect();
            let k = k.min(row.len()).max(1);
            row.select_nth_unstable_by(k - 1, |p, q| p.total_cmp(q));
            row[k - 1].sqrt()
        })
        .collect()
}

/// Precision, recall, density and coverage with k nearest neighbours.
pub fn prdc(real: &[f32], fake: &[f32], d: usize, k: usize) -> (f64, f64, f64, f64) {
    let (n, m) = (real.len() / d, fake.len() / d);
    let rr = knn_radii(real, d, k);
    let rf = knn_radii(fake, d, k);
    let dist = sq_dists(real, fake, d); // [n, m]
    let precision = (0..m)
        .filter(|&j| (0..n).any(|i| dist[i * m + j].sqrt() <= rr[i]))
        .count() as f64
        / m as f64;
    let recall = (0..n)
        .filter(|&i| (0..m).any(|j| dist[i * m + j].sqrt() <= rf[j]))
        .count() as f64
        / n as f64;
    let density = (0..m)
        .map(|j| (0..n).filter(|&i| dist[i * m + j].sqrt() <= rr[i]).count())
        .sum::<usize>() as f64
        / (k as f64 * m as f64);
    let coverage = (0..n)
        .filter(|&i| {
            let nearest = (0..m)
                .map(|j| dist[i * m + j])
                .fold(f32::INFINITY, f32::min)
                .sqrt();
            nearest <= rr[i]
        })
        .count() as f64
        / n as f64;
    (precision, recall, density, coverage)
}

/// All metrics between real and fake sets.
pub fn compare(real: &[f32], fake: &[f32], d: usize, sigmas: &[f32], seed: u32) -> Metrics {
    let mut rng = crate::rng::HostRng::new(seed, &[0x4b49_4400]);
    let (kid, kid_std) = kid(fake, real, d, 10, 100, &mut rng);
    let (precision, recall, density, coverage) = prdc(real, fake, d, 5);
    Metrics {
        mmd2: mmd2(fake, real, d, sigmas),
        kid,
        kid_std,
        precision,
        recall,
        density,
        coverage,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::HostRng;

    fn gauss(rng: &mut HostRng, n: usize, d: usize, shift: f32) -> Vec<f32> {
        (0..n * d).map(|_| rng.normal() as f32 + shift).collect()
    }

    #[test]
    fn identical_distributions_score_well_and_shifted_ones_badly() {
        let mut rng = HostRng::new(1, &[]);
        let d = 8;
        let a = gauss(&mut rng, 300, d, 0.0);
        let b = gauss(&mut rng, 300, d, 0.0);
        let c = gauss(&mut rng, 300, d, 2.0);
        let same = compare(&a, &b, d, &[1.0, 4.0], 1);
        let shifted = compare(&a, &c, d, &[1.0, 4.0], 1);
        assert!(
            same.mmd2 < 0.02 && shifted.mmd2 > 0.1,
            "{same:?} {shifted:?}"
        );
        assert!(same.kid.abs() < 0.05 && shifted.kid > 0.5);
        assert!(same.precision > 0.8 && same.recall > 0.8 && same.coverage > 0.8);
        assert!(shifted.precision < 0.3 && shifted.coverage < 0.3);
        assert!((same.density - 1.0).abs() < 0.3);
    }

    #[test]
    fn collapsed_fakes_have_precision_but_no_recall() {
        let mut rng = HostRng::new(2, &[]);
        let d = 4;
        let real = gauss(&mut rng, 200, d, 0.0);
        let one = real[..d].to_vec();
        let fake: Vec<f32> = (0..200).flat_map(|_| one.iter().copied()).collect();
        let (p, r, _, c) = prdc(&real, &fake, d, 5);
        assert!(p > 0.9 && r < 0.1 && c < 0.1, "{p} {r} {c}");
    }
}
