//! From a configuration's names to data and networks: which dataset a name means, its
//! channels, and its images at a generator's resolution.

use std::path::Path;

use super::locate::{self, Named, Split};
use super::{read_image_folder, Dataset};
use crate::error::{Error, Result};
use crate::nn::{Architecture, Shape};
use crate::rng::HostRng;

/// Stream tag of the held-out split of folder datasets.
const FOLDER_SPLIT: u32 = 0x464f_4c44;

/// The images of a folder dataset of `n` images held out from training: a tenth of them (at
/// least 1, at most 1000), chosen by the run seed; the rest is the training split. Sorted.
pub fn folder_heldout(n: usize, seed: u32) -> Vec<usize> {
    let k = (n / 10).clamp(1, 1000);
    let mut all: Vec<usize> = (0..n).collect();
    HostRng::new(seed, &[FOLDER_SPLIT]).shuffle(&mut all);
    let mut held = all[..k.min(n)].to_vec();
    held.sort_unstable();
    held
}

/// Image channels of a dataset: 1 for MNIST and Fashion-MNIST, 3 for CIFAR-10 and folders.
pub fn dataset_channels(name: &str) -> usize {
    match Named::parse(name) {
        Some(Named::Mnist | Named::FashionMnist) => 1,
        _ => 3,
    }
}

/// Loads the training (or test) images of a configuration at the generator's resolution.
/// `seed` chooses a folder dataset's held-out split ([`folder_heldout`]).
pub fn load_dataset(
    name: &str,
    data: Option<&Path>,
    fetch: bool,
    split: Split,
    arch_name: &str,
    seed: u32,
) -> Result<(Dataset, Architecture)> {
    let arch = Architecture::preset(arch_name, dataset_channels(name))?;
    let ds = load_images(name, data, fetch, split, arch.output()?, seed)?;
    Ok((ds, arch))
}

/// The images of a dataset's `split` at per-image shape `out`: a named dataset's own split,
/// or for a folder of images the held-out split that `seed` chooses (or the rest, to train).
pub fn load_images(
    name: &str,
    data: Option<&Path>,
    fetch: bool,
    split: Split,
    out: Shape,
    seed: u32,
) -> Result<Dataset> {
    let ds = match Named::parse(name) {
        Some(n) => locate::load(n, data, split, fetch)?,
        None => {
            let path = Path::new(name);
            if !path.is_dir() {
                return Err(Error::DataNotFound(format!(
                    "{name:?} is neither a known dataset (mnist, fashion-mnist, cifar10) nor a folder of images"
                )));
            }
            let all = read_image_folder(path, out.h, 3)?;
            if all.len() < 2 {
                return Err(Error::DataNotFound(format!(
                    "{name}: a folder dataset needs at least 2 images (one is held out)"
                )));
            }
            let held = folder_heldout(all.len(), seed);
            match split {
                Split::Test => all.subset(&held),
                Split::Train => {
                    let mut keep = vec![true; all.len()];
                    held.iter().for_each(|&i| keep[i] = false);
                    let rest: Vec<usize> = (0..all.len()).filter(|&i| keep[i]).collect();
                    all.subset(&rest)
                }
            }
        }
    };
    ds.with_channels(out.c)?.resized(out.h, out.w)
}
