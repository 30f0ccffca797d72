//! From a configuration's names to data and networks: which dataset a name means, its
//! channels, and its images at a generator's resolution.

use std::path::Path;

use super::locate::{self, Named, Split};
use super::{read_image_folder, Dataset};
use crate::error::{Error, Result};
use crate::nn::Architecture;

/// Image channels of a dataset: 1 for MNIST and Fashion-MNIST, 3 for CIFAR-10 and folders.
pub fn dataset_channels(name: &str) -> usize {
    match Named::parse(name) {
        Some(Named::Mnist | Named::FashionMnist) => 1,
        _ => 3,
    }
}

/// Loads the training (or test) images of a configuration at the generator's resolution.
pub fn load_dataset(
    name: &str,
    data: Option<&Path>,
    fetch: bool,
    split: Split,
    arch_name: &str,
) -> Result<(Dataset, Architecture)> {
    let arch = Architecture::preset(arch_name, dataset_channels(name))?;
    let ds = match Named::parse(name) {
        Some(n) => locate::load(n, data, split, fetch)?,
        None => {
            let path = Path::new(name);
            if !path.is_dir() {
                return Err(Error::DataNotFound(format!(
                    "{name:?} is neither a known dataset (mnist, fashion-mnist, cifar10) nor a folder of images"
                )));
            }
            read_image_folder(path, arch.output()?.h, 3)?
        }
    };
    let out = arch.output()?;
    let ds = ds.with_channels(out.c)?.resized(out.h, out.w)?;
    Ok((ds, arch))
}
