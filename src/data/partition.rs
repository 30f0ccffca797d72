//! Splitting a dataset among clients (PRISM.md section 4).

use crate::error::{Error, Result};
use crate::rng::HostRng;

/// How client datasets are drawn.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Partition {
    /// Equal random split.
    Iid,
    /// Sort by label, cut into `shards_per_client * clients` shards, give each client that many
    /// random shards (the paper's non-IID default: 4 shards, about 4 classes a client).
    Shards { shards_per_client: usize },
    /// Per class, client proportions from Dirichlet(alpha); each client gets at least
    /// `min_size` samples (redrawn until it holds).
    Dirichlet { alpha: f64, min_size: usize },
}

impl Partition {
    /// Parses `iid`, `shards[:N]` or `dirichlet[:ALPHA]`.
    pub fn parse(s: &str) -> Result<Partition> {
        let (kind, arg) = match s.split_once(':') {
            Some((k, a)) => (k, Some(a)),
            None => (s, None),
        };
        let num = |a: Option<&str>, default: f64| -> Result<f64> {
            match a {
                None => Ok(default),
                Some(a) => a
                    .parse::<f64>()
                    .ok()
                    .filter(|v| v.is_finite() && *v > 0.0)
                    .ok_or_else(|| Error::invalid(format!("bad partition parameter {a:?}"))),
            }
        };
        match kind {
            "iid" => Ok(Partition::Iid),
            "shards" | "non-iid" => Ok(Partition::Shards {
                shards_per_client: match arg {
                    None => 4,
                    Some(a) => a.parse::<usize>().ok().filter(|&v| v > 0).ok_or_else(|| {
                        Error::invalid(format!(
                            "bad partition parameter {a:?}: shards:N takes a whole number of \
                             shards per client, at least 1"
                        ))
                    })?,
                },
            }),
            "dirichlet" => Ok(Partition::Dirichlet {
                alpha: num(arg, 0.005)?,
                min_size: 10,
            }),
            _ => Err(Error::invalid(format!(
                "unknown partition {s:?}: use iid, shards[:N] or dirichlet[:ALPHA]"
            ))),
        }
    }

    /// Splits the sample indices of a dataset with these labels among `clients`.
    pub fn split(
        &self,
        labels: &[u8],
        clients: usize,
        rng: &mut HostRng,
    ) -> Result<Vec<Vec<usize>>> {
        let n = labels.len();
        if clients == 0 {
            return Err(Error::invalid("need at least one client"));
        }
        if n < clients {
            return Err(Error::invalid(format!(
                "{n} samples cannot be split among {clients} clients"
            )));
        }
        match *self {
            Partition::Iid => {
                let mut idx: Vec<usize> = (0..n).collect();
                rng.shuffle(&mut idx);
                Ok((0..clients)
                    .map(|c| idx[c * n / clients..(c + 1) * n / clients].to_vec())
                    .collect())
            }
            Partition::Shards { shards_per_client } => {
                let shards_per_client = shards_per_client.max(1);
                // Checked: both factors are user input (`shards:N`, `--clients`).
                let shards = shards_per_client
                    .checked_mul(clients)
                    .filter(|&s| s <= n)
                    .ok_or_else(|| {
                        Error::invalid(format!(
                            "{n} samples cannot make {shards_per_client} shards for each of \
                             {clients} clients; use fewer shards a client (shards:N) or fewer \
                             clients"
                        ))
                    })?;
                let mut idx: Vec<usize> = (0..n).collect();
                idx.sort_by_key(|&i| labels[i]); // stable: ties keep index order
                let mut order: Vec<usize> = (0..shards).collect();
                rng.shuffle(&mut order);
                Ok((0..clients)
                    .map(|c| {
                        order[c * shards_per_client..(c + 1) * shards_per_client]
                            .iter()
                            .flat_map(|&s| {
                                idx[s * n / shards..(s + 1) * n / shards].iter().copied()
                            })
                            .collect()
                    })
                    .collect())
            }
            Partition::Dirichlet { alpha, min_size } => {
                if min_size.checked_mul(clients).is_none_or(|need| need > n) {
                    return Err(Error::invalid(format!(
                        "{n} samples cannot give {clients} clients {min_size} each"
                    )));
                }
                let classes = labels.iter().copied().max().map_or(0, |m| m as usize + 1);
                let mut by_class: Vec<Vec<usize>> = vec![Vec::new(); classes];
                for (i, &l) in labels.iter().enumerate() {
                    by_class[l as usize].push(i);
                }
                for _attempt in 0..1000 {
                    let mut parts: Vec<Vec<usize>> = vec![Vec::new(); clients];
                    for members in &by_class {
                        let mut m = members.clone();
                        rng.shuffle(&mut m);
                        let g: Vec<f64> =
                            (0..clients).map(|_| rng.gamma(alpha).max(1e-300)).collect();
                        let total: f64 = g.iter().sum();
                        let mut start = 0;
                        let mut acc = 0.0;
                        for (c, gc) in g.iter().enumerate() {
                            acc += gc / total;
                            let end = if c + 1 == clients {
                                m.len()
                            } else {
                                ((acc * m.len() as f64).round() as usize).min(m.len())
                            };
                            parts[c].extend_from_slice(&m[start..end.max(start)]);
                            start = end.max(start);
                        }
                    }
                    if parts.iter().all(|p| p.len() >= min_size) {
                        return Ok(parts);
                    }
                }
                Err(Error::invalid(format!(
                    "Dirichlet({alpha}) gave some client fewer than {min_size} samples in 1000 draws; use a larger alpha"
                )))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels() -> Vec<u8> {
        (0..6000).map(|i| (i % 10) as u8).collect()
    }

    fn covers_once(parts: &[Vec<usize>], n: usize) {
        let mut seen = vec![false; n];
        for p in parts {
            for &i in p {
                assert!(!seen[i], "sample {i} given twice");
                seen[i] = true;
            }
        }
        assert!(seen.iter().all(|&s| s), "every sample is given to someone");
    }

    #[test]
    fn hostile_partition_parameters_are_refused_by_name() {
        // Issue 18: shards:2^63 wrapped `shards_per_client * clients` and panicked; shards:2.5
        // silently became 2.
        for bad in [
            "shards:2.5",
            "shards:0",
            "shards:-1",
            "shards:x",
            "shards:1e3",
        ] {
            let e = Partition::parse(bad).unwrap_err().to_string();
            assert!(e.contains("whole number"), "{bad}: {e}");
        }
        let l = labels();
        for (per, clients) in [
            (9_223_372_036_854_775_808usize, 2usize),
            (usize::MAX, 2),
            (2, usize::MAX / 2 + 1),
            (3000, 3),
        ] {
            let e = Partition::Shards {
                shards_per_client: per,
            }
            .split(&l, clients.min(6000), &mut HostRng::new(1, &[]))
            .unwrap_err()
            .to_string();
            assert!(e.contains(&format!("{per} shards for each of")), "{e}");
        }
        let e = Partition::Dirichlet {
            alpha: 1.0,
            min_size: usize::MAX / 2,
        }
        .split(&l, 3, &mut HostRng::new(1, &[]))
        .unwrap_err()
        .to_string();
        assert!(e.contains("cannot give 3 clients"), "{e}");
    }

    #[test]
    fn iid_is_balanced() {
        let l = labels();
        let parts = Partition::Iid
            .split(&l, 10, &mut HostRng::new(1, &[]))
            .unwrap();
        covers_once(&parts, l.len());
        assert!(parts.iter().all(|p| p.len() == 600));
        let classes: std::collections::HashSet<u8> = parts[0].iter().map(|&i| l[i]).collect();
        assert_eq!(classes.len(), 10);
    }

    #[test]
    fn shards_give_about_four_classes() {
        let l = labels();
        let parts = Partition::Shards {
            shards_per_client: 4,
        }
        .split(&l, 10, &mut HostRng::new(2, &[]))
        .unwrap();
        covers_once(&parts, l.len());
        for p in &parts {
            let classes: std::collections::HashSet<u8> = p.iter().map(|&i| l[i]).collect();
            assert!((1..=4).contains(&classes.len()), "{}", classes.len());
        }
    }

    #[test]
    fn dirichlet_is_skewed_and_respects_the_minimum() {
        let l = labels();
        let parts = Partition::Dirichlet {
            alpha: 0.1,
            min_size: 10,
        }
        .split(&l, 10, &mut HostRng::new(3, &[]))
        .unwrap();
        covers_once(&parts, l.len());
        assert!(parts.iter().all(|p| p.len() >= 10));
        let max_classes = parts
            .iter()
            .map(|p| {
                p.iter()
                    .map(|&i| l[i])
                    .collect::<std::collections::HashSet<u8>>()
                    .len()
            })
            .min()
            .unwrap();
        assert!(max_classes < 10);
        assert!(Partition::parse("dirichlet:0.5").is_ok());
        assert!(Partition::parse("dirichlet:-1").is_err());
        assert!(Partition::parse("bogus").is_err());
    }
}
