//! Random variates the simulation needs, on `rand`'s small generator: Poisson counts (exact,
//! by multiplication for small means and Hörmann's PTRS rejection for large ones) and
//! geometric burst sizes.

use rand::Rng;
use rand::SeedableRng;
use rand::rngs::SmallRng;
use statrs::function::gamma::ln_gamma;

/// The generator of one repetition, derived from the run's seed, the scenario's key
/// ([`name_key`] of its name) and the repetition's number, so that results depend neither on
/// how work is spread over threads nor on which other scenarios the file has.
pub fn generator(seed: u64, scenario: u64, rep: u32) -> SmallRng {
    let mut x = seed ^ 0x9E37_79B9_7F4A_7C15;
    x = splitmix(x ^ scenario.wrapping_mul(0xD1B5_4A32_D192_ED03));
    x = splitmix(x ^ u64::from(rep).wrapping_mul(0x8CB9_2BA7_2F3D_8DD7));
    SmallRng::seed_from_u64(x)
}

/// A scenario's key for [`generator`]: the 64-bit FNV-1a hash of its name's UTF-8 bytes,
/// written out here so that it never changes with the Rust version (unlike std's
/// `DefaultHasher`).
pub fn name_key(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A uniform number in (0, 1).
fn open01(rng: &mut SmallRng) -> f64 {
    loop {
        let u: f64 = rng.random();
        if u > 0.0 {
            return u;
        }
    }
}

/// A Poisson(`mean`) count.
pub fn poisson(rng: &mut SmallRng, mean: f64) -> f64 {
    if mean.is_nan() || mean <= 1e-12 {
        return 0.0;
    }
    if mean < 12.0 {
        // Multiply uniforms until the product drops below e^-mean.
        let limit = (-mean).exp();
        let mut k = 0.0;
        let mut p = open01(rng);
        while p > limit {
            k += 1.0;
            p *= open01(rng);
        }
        return k;
    }
    ptrs(rng, mean)
}

/// Hörmann (1993), "The transformed rejection method for generating Poisson random
/// variables", algorithm PTRS; exact for means of 10 and more.
fn ptrs(rng: &mut SmallRng, mean: f64) -> f64 {
    let slam = mean.sqrt();
    let loglam = mean.ln();
    let b = 0.931 + 2.53 * slam;
    let a = -0.059 + 0.02483 * b;
    let inv_alpha = 1.1239 + 1.1328 / (b - 3.4);
    let vr = 0.9277 - 3.6224 / (b - 2.0);
    loop {
        let u = open01(rng) - 0.5;
        let v = open01(rng);
        let us = 0.5 - u.abs();
        let k = ((2.0 * a / us + b) * u + mean + 0.43).floor();
        if us >= 0.07 && v <= vr {
            return k;
        }
        if k < 0.0 || (us < 0.013 && v > us) {
            continue;
        }
        let lhs = v.ln() + inv_alpha.ln() - (a / (us * us) + b).ln();
        let rhs = -mean + k * loglam - ln_gamma(k + 1.0);
        if lhs <= rhs {
            return k;
        }
    }
}

/// Bursts in one draw above which their sizes are summed by the normal approximation.
const EXACT_BURSTS: f64 = 1000.0;

/// A standard normal variate (Box–Muller).
fn normal(rng: &mut SmallRng) -> f64 {
    let (u, v) = (open01(rng), open01(rng));
    (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
}

/// Events that arrive in bursts: Poisson(`mean / size`) bursts of geometric size with mean
/// `size` (so the mean count is `mean`); `size` 1 is a plain Poisson count.
pub fn bursty(rng: &mut SmallRng, mean: f64, size: f64) -> f64 {
    if size <= 1.0 {
        return poisson(rng, mean);
    }
    let bursts = poisson(rng, mean / size);
    if bursts > EXACT_BURSTS {
        // The extra events of many bursts are a negative binomial sum, normal to well within
        // what a scrape's count can show; drawing each burst would make the cost grow with
        // the error count (minutes per repetition at millions of errors per scrape).
        let extra_mean = bursts * (size - 1.0);
        let extra_var = bursts * (size - 1.0) * size;
        let extra = (extra_mean + extra_var.sqrt() * normal(rng))
            .round()
            .max(0.0);
        return bursts + extra;
    }
    let ln_q = (1.0 - 1.0 / size).ln();
    let mut total = 0.0;
    let mut i = 0.0;
    while i < bursts {
        total += 1.0 + (open01(rng).ln() / ln_q).floor();
        i += 1.0;
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    fn moments(f: impl Fn(&mut SmallRng) -> f64) -> (f64, f64) {
        let mut rng = generator(7, 0, 0);
        let n = 200_000;
        let xs: Vec<f64> = (0..n).map(|_| f(&mut rng)).collect();
        let m = xs.iter().sum::<f64>() / n as f64;
        let v = xs.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / (n - 1) as f64;
        (m, v)
    }

    /// Many bursts at once are summed by the normal approximation, with the same mean and
    /// variance as the exact sum: a compound Poisson count has variance mean·(2·size − 1).
    #[test]
    fn many_bursts_keep_the_compound_mean_and_variance() {
        for (mean, size) in [(20_000.0, 3.0), (5_000_000.0, 1.5)] {
            let (m, v) = moments(|r| bursty(r, mean, size));
            let var = mean * (2.0 * size - 1.0);
            let se = (var / 200_000.0).sqrt();
            assert!((m - mean).abs() < 5.0 * se, "mean {m} for {mean}");
            assert!((v / var - 1.0).abs() < 0.05, "variance {v} against {var}");
        }
    }

    #[test]
    fn name_key_is_fnv1a_64() {
        // The reference values of the FNV-1a 64-bit hash.
        assert_eq!(name_key(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(name_key("a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(name_key("foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn poisson_has_the_right_mean_and_variance() {
        for mean in [0.3, 5.0, 11.9, 12.0, 47.5, 2500.0] {
            let (m, v) = moments(|r| poisson(r, mean));
            let se = (mean / 200_000.0).sqrt();
            assert!((m - mean).abs() < 5.0 * se, "mean {mean}: got {m}");
            assert!((v / mean - 1.0).abs() < 0.03, "mean {mean}: variance {v}");
        }
    }

    #[test]
    fn bursts_keep_the_mean_and_inflate_the_variance() {
        // Geometric sizes with mean m have E[B²]/E[B] = 2m − 1: 9 for m = 5.
        let (m, v) = moments(|r| bursty(r, 50.0, 5.0));
        assert!((m - 50.0).abs() < 0.5, "mean {m}");
        assert!((v / m - 9.0).abs() < 0.5, "dispersion {}", v / m);
    }
}
