//! Checkpoints of a federated run: everything needed to continue it exactly (the global scores,
//! the server's Beta priors, every client's Adam moments and step counter, the metrics so far).
//!
//! Layout (little endian): magic "PRCK" | version u32 | config JSON (u32 length + bytes) |
//! rounds done u32 | layers u32 | per layer: weights u32, scores f32\[n\], prior f32\[2n\] |
//! clients u32 | per client: step u32, moments f32\[2n\] per layer, (version 2) loss state
//! arrays u32 and per array: length u32, f32\[length\] | metrics JSON (u32 length + bytes) |
//! crc32 of all before. Version 1 (no loss state) still reads.
//!
//! Written to a temporary file, synced, then renamed over the old one: a crash at any moment
//! leaves either the previous checkpoint or the new one, never a mix.

use std::io::Write;
use std::path::Path;

use super::config::TrainConfig;
use crate::bytes::{split_crc, Reader};
use crate::error::{Error, Result};

const MAGIC: &[u8; 4] = b"PRCK";
const VERSION: u32 = 2;

/// The state of a run after some rounds.
#[derive(Clone, Debug, PartialEq)]
pub struct Checkpoint {
    pub config: TrainConfig,
    pub rounds_done: u32,
    pub scores: Vec<Vec<f32>>,
    pub priors: Vec<Vec<f32>>,
    pub client_steps: Vec<u32>,
    /// Moments per client and layer, `2n` each.
    pub client_moments: Vec<Vec<Vec<f32>>>,
    /// [client][array] the loss's own state (moment matching: trackers and their Adam
    /// moments; empty for kernel MMD).
    pub client_loss: Vec<Vec<Vec<f32>>>,
    /// The metrics log so far, one JSON object per round.
    pub metrics: Vec<serde_json::Value>,
}

fn put_f32s(out: &mut Vec<u8>, v: &[f32]) {
    out.reserve(v.len() * 4);
    for x in v {
        out.extend_from_slice(&x.to_le_bytes());
    }
}

impl Checkpoint {
    pub fn encode(&self) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        let cfg = serde_json::to_vec(&self.config).map_err(|e| Error::invalid(e.to_string()))?;
        out.extend_from_slice(&(cfg.len() as u32).to_le_bytes());
        out.extend_from_slice(&cfg);
        out.extend_from_slice(&self.rounds_done.to_le_bytes());
        out.extend_from_slice(&(self.scores.len() as u32).to_le_bytes());
        for (s, p) in self.scores.iter().zip(&self.priors) {
            out.extend_from_slice(&(s.len() as u32).to_le_bytes());
            put_f32s(&mut out, s);
            put_f32s(&mut out, p);
        }
        out.extend_from_slice(&(self.client_steps.len() as u32).to_le_bytes());
        let no_loss = Vec::new();
        for (k, (step, moments)) in self
            .client_steps
            .iter()
            .zip(&self.client_moments)
            .enumerate()
        {
            out.extend_from_slice(&step.to_le_bytes());
            for m in moments {
                put_f32s(&mut out, m);
            }
            let loss = self.client_loss.get(k).unwrap_or(&no_loss);
            out.extend_from_slice(&(loss.len() as u32).to_le_bytes());
            for a in loss {
                out.extend_from_slice(&(a.len() as u32).to_le_bytes());
                put_f32s(&mut out, a);
            }
        }
        let metrics =
            serde_json::to_vec(&self.metrics).map_err(|e| Error::invalid(e.to_string()))?;
        out.extend_from_slice(&(metrics.len() as u32).to_le_bytes());
        out.extend_from_slice(&metrics);
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        Ok(out)
    }

    pub fn decode(bytes: &[u8], what: &str) -> Result<Checkpoint> {
        let bad = |m: String| Error::format(what, m);
        if bytes.len() < 12 {
            return Err(bad("too short to be a checkpoint".into()));
        }
        if &bytes[..4] != MAGIC {
            return Err(bad("not a prism checkpoint (wrong magic)".into()));
        }
        let body = split_crc(bytes, what)?;
        let mut r = Reader::new(body, what);
        r.take(4)?;
        let version = r.u32()?;
        if !(1..=VERSION).contains(&version) {
            return Err(bad(format!("version {version} is not 1 to {VERSION}")));
        }
        let n = r.u32()? as usize;
        let config: TrainConfig =
            serde_json::from_slice(r.take(n)?).map_err(|e| bad(format!("configuration: {e}")))?;
        config.validate()?;
        let rounds_done = r.u32()?;
        if rounds_done as usize > config.rounds {
            return Err(bad(format!(
                "{rounds_done} rounds done, but the run has only {}",
                config.rounds
            )));
        }
        // The steps a client may still take: its counter must not wrap before the run ends
        // (the mask, latent and data streams and Adam's t all count with it).
        let steps_left = (config.rounds - rounds_done as usize) as u64 * config.local_steps as u64;
        let layers = r.u32()? as usize;
        let mut scores = Vec::new();
        let mut priors = Vec::new();
        let mut sizes = Vec::new();
        for i in 0..layers {
            // The reader refuses lengths beyond the bytes present, so nothing is allocated
            // from an absurd size.
            let w = r.u32()? as usize;
            scores.push(r.finite_f32s(w, &format!("layer {i}: scores"))?);
            priors.push(r.finite_f32s(2 * w, &format!("layer {i}: priors"))?);
            sizes.push(w);
        }
        let clients = r.u32()? as usize;
        if clients != config.clients {
            return Err(bad(format!(
                "{clients} clients but the configuration has {}",
                config.clients
            )));
        }
        let mut client_steps = Vec::new();
        let mut client_moments = Vec::new();
        let mut client_loss = Vec::new();
        for k in 0..clients {
            let step = r.u32()?;
            if step as u64 + steps_left > u32::MAX as u64 {
                return Err(bad(format!(
                    "client {k}: step counter {step} would pass {} in the {steps_left} steps \
                     left",
                    u32::MAX
                )));
            }
            client_steps.push(step);
            let mut ms = Vec::new();
            for &w in &sizes {
                ms.push(r.finite_f32s(2 * w, &format!("client {k}: Adam moments"))?);
            }
            client_moments.push(ms);
            let mut ls = Vec::new();
            if version >= 2 {
                let arrays = r.u32()? as usize;
                for a in 0..arrays {
                    let n = r.u32()? as usize;
                    ls.push(r.finite_f32s(n, &format!("client {k}: loss state {a}"))?);
                }
            }
            client_loss.push(ls);
        }
        let n = r.u32()? as usize;
        let metrics: Vec<serde_json::Value> =
            serde_json::from_slice(r.take(n)?).map_err(|e| bad(format!("metrics: {e}")))?;
        r.finish()?;
        Ok(Checkpoint {
            config,
            rounds_done,
            scores,
            priors,
            client_steps,
            client_moments,
            client_loss,
            metrics,
        })
    }

    /// Writes atomically: temporary file, fsync, rename, fsync of the folder.
    pub fn save(&self, path: &Path) -> Result<()> {
        let bytes = self.encode()?;
        // Loading's checks before the rename, so that a checkpoint that would not load (NaN
        // moments, a counter about to wrap) never replaces a good one.
        Checkpoint::decode(&bytes, &path.display().to_string()).map_err(|e| {
            Error::invalid(format!(
                "not writing a checkpoint that could not be resumed ({e}); {} is unchanged",
                path.display()
            ))
        })?;
        write_atomic(path, &bytes)
    }

    pub fn load(path: &Path) -> Result<Checkpoint> {
        // No size bound of the format's own (it grows with clients x weights): the magic and
        // the memory this process may take are checked before the file is read.
        let bytes = crate::bytes::read_file(path, MAGIC, u64::MAX, "prism checkpoint")?;
        Checkpoint::decode(&bytes, &path.display().to_string())
    }
}

/// Replaces `path` by `bytes` so that readers see the old or the new content, never a part.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file"),
        std::process::id()
    ));
    let written = (|| {
        let mut f = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        f.write_all(bytes).map_err(|e| Error::io(&tmp, e))?;
        f.sync_all().map_err(|e| Error::io(&tmp, e))
    })();
    crate::io::commit_part(&tmp, path, written)?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Checkpoint {
        Checkpoint {
            config: TrainConfig {
                clients: 2,
                ..Default::default()
            },
            rounds_done: 3,
            scores: vec![vec![0.5, -1.0, 2.0], vec![3.0]],
            priors: vec![vec![1.0; 6], vec![2.0, 3.0]],
            client_steps: vec![10, 20],
            client_moments: vec![
                vec![vec![0.1; 6], vec![0.2; 2]],
                vec![vec![0.3; 6], vec![0.4; 2]],
            ],
            client_loss: vec![
                vec![vec![0.5; 4], vec![-0.5; 8]],
                vec![vec![1.5; 4], vec![2.5; 8]],
            ],
            metrics: vec![serde_json::json!({"round": 1, "loss": 0.5})],
        }
    }

    #[test]
    fn round_trip_and_damage() {
        let c = sample();
        let bytes = c.encode().unwrap();
        assert_eq!(Checkpoint::decode(&bytes, "t").unwrap(), c);
        for cut in [0, 5, 40, bytes.len() - 1] {
            assert!(Checkpoint::decode(&bytes[..cut], "t").is_err());
        }
        let mut flipped = bytes.clone();
        flipped[60] ^= 4;
        assert!(Checkpoint::decode(&flipped, "t")
            .unwrap_err()
            .to_string()
            .contains("checksum"));
    }

    #[test]
    fn a_checkpoint_that_could_not_be_resumed_is_neither_read_nor_written() {
        // Issue 18: a step counter near u32::MAX wrapped, Adam's moments became NaN, and the
        // run wrote that checkpoint over the good one; rounds_done > rounds was accepted.
        let dir = std::env::temp_dir().join(format!("prism-ckpt-bad-{}", std::process::id()));
        let p = dir.join("checkpoint.bin");
        let good = sample();
        good.save(&p).unwrap();
        let mut wraps = sample();
        wraps.client_steps[1] = u32::MAX - 10;
        let e = wraps.save(&p).unwrap_err().to_string();
        assert!(
            e.contains("client 1: step counter 4294967285 would pass"),
            "{e}"
        );
        assert!(e.contains("is unchanged"), "{e}");
        let mut nan = sample();
        nan.client_moments[0][1][0] = f32::NAN;
        let e = nan.save(&p).unwrap_err().to_string();
        assert!(e.contains("client 0: Adam moments"), "{e}");
        let mut ahead = sample();
        ahead.rounds_done = ahead.config.rounds as u32 + 1;
        let e = Checkpoint::decode(&ahead.encode().unwrap(), "t")
            .unwrap_err()
            .to_string();
        assert!(e.contains("rounds done, but the run has only"), "{e}");
        assert_eq!(
            Checkpoint::load(&p).unwrap(),
            good,
            "the good one is still there"
        );
        let leftovers: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .filter(|n| n.to_string_lossy().contains(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
        // A failed rename (onto a folder) leaves no temporary file either.
        let folder = dir.join("taken");
        std::fs::create_dir_all(folder.join("inside")).unwrap();
        assert!(write_atomic(&folder, b"x").is_err());
        assert!(!std::fs::read_dir(&dir).unwrap().any(|e| e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .contains(".tmp")));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn atomic_write_replaces() {
        let dir = std::env::temp_dir().join(format!("prism-ckpt-{}", std::process::id()));
        let p = dir.join("c.bin");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        let leftovers = std::fs::read_dir(&dir).unwrap().count();
        assert_eq!(leftovers, 1, "no temporary files left behind");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
