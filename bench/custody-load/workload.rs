//! What the harness asks for: which asset (uniform, or Zipf-skewed like a real book where a
//! few assets take most of the flow) and which operation (the mix of DERIVE, ROTATE and
//! STATUS). Pure and deterministic from a seed, so a run can be repeated.

use anyhow::{bail, Context};

/// xorshift64: fast, deterministic, good enough to spread load (not for secrets).
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        // Never zero: xorshift stays at zero.
        Rng(seed ^ 0x2545_f491_4f6c_dd1d | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// How requests spread over the assets.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Distribution {
    Uniform,
    /// Rank k (1-based) is chosen with weight 1 / k^s.
    Zipf {
        s: f64,
    },
}

impl Distribution {
    /// `uniform`, `zipf` (s = 1) or `zipf:S` with 0 < S <= 5.
    pub fn parse(text: &str) -> anyhow::Result<Distribution> {
        match text.split_once(':') {
            None if text == "uniform" => Ok(Distribution::Uniform),
            None if text == "zipf" => Ok(Distribution::Zipf { s: 1.0 }),
            Some(("zipf", s)) => {
                let s: f64 = s.parse().with_context(|| format!("zipf exponent {s:?}"))?;
                if !(s > 0.0 && s <= 5.0) {
                    bail!("the zipf exponent must be in (0, 5], not {s}");
                }
                Ok(Distribution::Zipf { s })
            }
            _ => bail!("--distribution is uniform, zipf or zipf:S, not {text:?}"),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Distribution::Uniform => "uniform".into(),
            Distribution::Zipf { s } => format!("zipf:{s}"),
        }
    }
}

/// Picks an asset index in `0..n` by the distribution.
pub struct AssetPicker {
    n: usize,
    /// Zipf: the cumulative weights, normalised (the last is 1).
    cdf: Option<Vec<f64>>,
}

impl AssetPicker {
    pub fn new(n: usize, distribution: Distribution) -> AssetPicker {
        let cdf = match distribution {
            Distribution::Uniform => None,
            Distribution::Zipf { s } => {
                let mut acc = 0.0;
                let mut cdf: Vec<f64> = (1..=n)
                    .map(|k| {
                        acc += 1.0 / (k as f64).powf(s);
                        acc
                    })
                    .collect();
                for c in &mut cdf {
                    *c /= acc;
                }
                Some(cdf)
            }
        };
        AssetPicker { n: n.max(1), cdf }
    }

    /// The asset for `u` uniform in [0, 1): index 0 is the most requested under Zipf.
    pub fn pick(&self, u: f64) -> usize {
        match &self.cdf {
            None => ((u * self.n as f64) as usize).min(self.n - 1),
            Some(cdf) => cdf.partition_point(|&c| c <= u).min(self.n - 1),
        }
    }
}

/// An operation of the mix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Op {
    Derive,
    Rotate,
    Status,
}

impl Op {
    pub const ALL: [Op; 3] = [Op::Derive, Op::Rotate, Op::Status];

    pub fn name(self) -> &'static str {
        match self {
            Op::Derive => "derive",
            Op::Rotate => "rotate",
            Op::Status => "status",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

/// The share of each operation, in parts per million.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mix {
    ppm: [u32; 3],
}

impl Default for Mix {
    fn default() -> Mix {
        Mix {
            ppm: [1_000_000, 0, 0],
        }
    }
}

impl Mix {
    /// `derive=90,rotate=5,status=5`: weights, in any unit (they are normalised); an
    /// operation not named gets none.
    pub fn parse(text: &str) -> anyhow::Result<Mix> {
        let mut weights = [0f64; 3];
        for part in text.split(',') {
            let (name, w) = part
                .split_once('=')
                .with_context(|| format!("--mix part {part:?} is not op=weight"))?;
            let op = Op::ALL
                .into_iter()
                .find(|op| op.name() == name.trim())
                .with_context(|| format!("--mix names {name:?}: derive, rotate or status"))?;
            let w: f64 = w
                .trim()
                .parse()
                .with_context(|| format!("--mix weight {w:?}"))?;
            if !(w >= 0.0 && w.is_finite()) {
                bail!("--mix weight of {name} must be a number >= 0, not {w}");
            }
            weights[op.index()] += w;
        }
        Mix::from_weights(weights)
    }

    /// `--rotate-percent P`: P % rotations, the rest derivations.
    pub fn rotate_percent(p: f64) -> anyhow::Result<Mix> {
        if !(0.0..=100.0).contains(&p) {
            bail!("--rotate-percent must be between 0 and 100");
        }
        Mix::from_weights([100.0 - p, p, 0.0])
    }

    fn from_weights(w: [f64; 3]) -> anyhow::Result<Mix> {
        let total: f64 = w.iter().sum();
        if total <= 0.0 {
            bail!("--mix needs a positive weight");
        }
        let mut ppm = w.map(|x| (x / total * 1e6).round() as u32);
        // Rounding: the derivations (or the largest share) take the remainder.
        let sum: u32 = ppm.iter().sum();
        let largest = (0..3).max_by_key(|&i| ppm[i]).unwrap_or(0);
        ppm[largest] = (ppm[largest] + 1_000_000).saturating_sub(sum);
        Ok(Mix { ppm })
    }

    pub fn share(&self, op: Op) -> f64 {
        self.ppm[op.index()] as f64 / 1e6
    }

    /// The operation for `r`, uniform over u64.
    pub fn pick(&self, r: u64) -> Op {
        let x = (r % 1_000_000) as u32;
        if x < self.ppm[0] {
            Op::Derive
        } else if x < self.ppm[0] + self.ppm[1] {
            Op::Rotate
        } else {
            Op::Status
        }
    }

    pub fn describe(&self) -> String {
        Op::ALL
            .iter()
            .filter(|op| self.ppm[op.index()] > 0)
            .map(|op| format!("{}={}", op.name(), self.ppm[op.index()] as f64 / 1e4))
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// `35ms`, `0.5s`, `500us` or a bare number of milliseconds.
pub fn parse_duration(text: &str) -> anyhow::Result<std::time::Duration> {
    let (number, scale) = if let Some(n) = text.strip_suffix("us") {
        (n, 1e-6)
    } else if let Some(n) = text.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = text.strip_suffix('s') {
        (n, 1.0)
    } else {
        (text, 1e-3)
    };
    let v: f64 = number
        .trim()
        .parse()
        .with_context(|| format!("{text:?} is not a duration (e.g. 35ms)"))?;
    if !(v > 0.0 && v.is_finite()) {
        bail!("{text:?}: a duration must be positive");
    }
    Ok(std::time::Duration::from_secs_f64(v * scale))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zipf_gives_each_rank_its_share() {
        let n = 1000;
        let picker = AssetPicker::new(n, Distribution::Zipf { s: 1.0 });
        let mut rng = Rng::new(7);
        let draws = 1_000_000;
        let mut counts = vec![0u32; n];
        for _ in 0..draws {
            counts[picker.pick(rng.next_f64())] += 1;
        }
        let h: f64 = (1..=n).map(|k| 1.0 / k as f64).sum();
        for (rank, &count) in counts.iter().enumerate().take(10) {
            let want = draws as f64 / ((rank + 1) as f64 * h);
            let got = count as f64;
            assert!(
                (got - want).abs() < 0.03 * want,
                "rank {}: {got} draws, {want:.0} expected",
                rank + 1
            );
        }
        // The head dominates: the first 10 of 1000 assets take about 39 %.
        let head: u32 = counts[..10].iter().sum();
        assert!(
            (0.37..0.41).contains(&(head as f64 / draws as f64)),
            "{head}"
        );
        assert!(counts[n - 1] > 0, "the tail is reached too");
    }

    #[test]
    fn uniform_spreads_evenly() {
        let picker = AssetPicker::new(100, Distribution::Uniform);
        let mut rng = Rng::new(1);
        let mut counts = [0u32; 100];
        for _ in 0..1_000_000 {
            counts[picker.pick(rng.next_f64())] += 1;
        }
        for c in counts {
            assert!((9_500..10_500).contains(&c), "{c}");
        }
        assert_eq!(picker.pick(0.999_999_999), 99);
    }

    #[test]
    fn the_mix_is_parsed_normalised_and_followed() {
        let mix = Mix::parse("derive=90,rotate=5,status=5").unwrap();
        assert_eq!(mix.describe(), "derive=90,rotate=5,status=5");
        let mut rng = Rng::new(3);
        let mut counts = [0u32; 3];
        for _ in 0..1_000_000 {
            counts[mix.pick(rng.next_u64()).index()] += 1;
        }
        assert!((895_000..905_000).contains(&counts[0]), "{counts:?}");
        assert!((48_000..52_000).contains(&counts[1]), "{counts:?}");
        assert!((48_000..52_000).contains(&counts[2]), "{counts:?}");
        assert_eq!(
            Mix::parse("derive=1,status=1").unwrap().share(Op::Status),
            0.5
        );
        assert_eq!(Mix::rotate_percent(10.0).unwrap().share(Op::Rotate), 0.1);
        for bad in ["derive", "sign=1", "derive=-1", "derive=0", "derive=x"] {
            assert!(Mix::parse(bad).is_err(), "{bad}");
        }
        assert!(Mix::rotate_percent(101.0).is_err());
    }

    #[test]
    fn distributions_and_durations_parse() {
        assert_eq!(
            Distribution::parse("uniform").unwrap(),
            Distribution::Uniform
        );
        assert_eq!(
            Distribution::parse("zipf:1.2").unwrap(),
            Distribution::Zipf { s: 1.2 }
        );
        for bad in ["zipf:0", "zipf:-1", "pareto", "zipf:x"] {
            assert!(Distribution::parse(bad).is_err(), "{bad}");
        }
        use std::time::Duration;
        assert_eq!(parse_duration("35ms").unwrap(), Duration::from_millis(35));
        assert_eq!(parse_duration("0.5s").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("250us").unwrap(), Duration::from_micros(250));
        assert_eq!(parse_duration("5").unwrap(), Duration::from_millis(5));
        assert!(parse_duration("-1ms").is_err());
    }
}
