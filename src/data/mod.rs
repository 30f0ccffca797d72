//! Datasets: readers (IDX for MNIST and Fashion-MNIST, CIFAR-10 binary, folders of PNG or
//! JPEG images), resizing and centring to a generator's resolution, client partitions
//! (IID, label shards, Dirichlet), and finding or fetching the files ([`locate`]).

pub mod idx;
pub mod locate;
pub mod partition;
pub mod resolve;

use std::path::Path;

use crate::error::{Error, Result};

/// Images with labels, stored as bytes in [channel, row, column] order per image.
#[derive(Clone, Debug, PartialEq)]
pub struct Dataset {
    pub name: String,
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    pub images: Vec<u8>,
    pub labels: Vec<u8>,
}

impl Dataset {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Bytes per image.
    pub fn image_len(&self) -> usize {
        self.channels * self.height * self.width
    }

    pub fn image(&self, i: usize) -> &[u8] {
        &self.images[i * self.image_len()..(i + 1) * self.image_len()]
    }

    /// Number of classes (largest label + 1).
    pub fn classes(&self) -> usize {
        self.labels
            .iter()
            .copied()
            .max()
            .map_or(0, |m| m as usize + 1)
    }

    /// Image `i` as floats in [-1, 1] (the range of the generators' tanh output).
    pub fn image_f32(&self, i: usize) -> Vec<f32> {
        self.image(i)
            .iter()
            .map(|&v| v as f32 / 127.5 - 1.0)
            .collect()
    }

    /// The images at `indices`.
    pub fn subset(&self, indices: &[usize]) -> Dataset {
        let mut images = Vec::with_capacity(indices.len() * self.image_len());
        for &i in indices {
            images.extend_from_slice(self.image(i));
        }
        Dataset {
            name: self.name.clone(),
            channels: self.channels,
            height: self.height,
            width: self.width,
            images,
            labels: indices.iter().map(|&i| self.labels[i]).collect(),
        }
    }

    /// The first `n` images.
    pub fn take(&self, n: usize) -> Dataset {
        self.subset(&(0..n.min(self.len())).collect::<Vec<_>>())
    }

    /// Brings images to `height` x `width`: zero-pads around the centre where the target is
    /// larger (MNIST 28 -> 32, as the paper's generators expect), and averages boxes where it is
    /// smaller (after a centred crop to the target's aspect ratio).
    pub fn resized(&self, height: usize, width: usize) -> Result<Dataset> {
        if height == 0 || width == 0 {
            return Err(Error::invalid("target size must be positive"));
        }
        if height == self.height && width == self.width {
            return Ok(self.clone());
        }
        let mut images = Vec::with_capacity(self.len() * self.channels * height * width);
        for i in 0..self.len() {
            let img = self.image(i);
            for c in 0..self.channels {
                let plane = &img[c * self.height * self.width..(c + 1) * self.height * self.width];
                images.extend(resize_plane(plane, self.height, self.width, height, width));
            }
        }
        Ok(Dataset {
            name: self.name.clone(),
            channels: self.channels,
            height,
            width,
            images,
            labels: self.labels.clone(),
        })
    }

    /// Converts to `channels` channels (grey -> RGB by repetition, RGB -> grey by luma).
    pub fn with_channels(&self, channels: usize) -> Result<Dataset> {
        match (self.channels, channels) {
            (a, b) if a == b => Ok(self.clone()),
            (1, 3) => {
                let hw = self.height * self.width;
                let mut images = Vec::with_capacity(self.images.len() * 3);
                for i in 0..self.len() {
                    let img = self.image(i);
                    for _ in 0..3 {
                        images.extend_from_slice(&img[..hw]);
                    }
                }
                Ok(Dataset {
                    channels: 3,
                    images,
                    ..self.clone()
                })
            }
            (3, 1) => {
                let hw = self.height * self.width;
                let mut images = Vec::with_capacity(self.images.len() / 3);
                for i in 0..self.len() {
                    let img = self.image(i);
                    for p in 0..hw {
                        let y = 0.299 * img[p] as f32
                            + 0.587 * img[hw + p] as f32
                            + 0.114 * img[2 * hw + p] as f32;
                        images.push(y.round().clamp(0.0, 255.0) as u8);
                    }
                }
                Ok(Dataset {
                    channels: 1,
                    images,
                    ..self.clone()
                })
            }
            (a, b) => Err(Error::invalid(format!(
                "cannot convert {a} channels to {b}"
            ))),
        }
    }
}

fn resize_plane(src: &[u8], sh: usize, sw: usize, th: usize, tw: usize) -> Vec<u8> {
    // Centred crop (or pad) to the target aspect ratio at the source scale, then box filter.
    let scale = (sh as f64 / th as f64).min(sw as f64 / tw as f64).max(1.0);
    let (ch, cw) = (
        (th as f64 * scale).round() as usize,
        (tw as f64 * scale).round() as usize,
    );
    let (oy, ox) = (sh as isize - ch as isize, sw as isize - cw as isize);
    let (oy, ox) = (oy / 2, ox / 2);
    let mut out = Vec::with_capacity(th * tw);
    for y in 0..th {
        for x in 0..tw {
            let y0 = (y as f64 * scale) as isize + oy;
            let x0 = (x as f64 * scale) as isize + ox;
            let y1 = (((y + 1) as f64 * scale) as isize + oy).max(y0 + 1);
            let x1 = (((x + 1) as f64 * scale) as isize + ox).max(x0 + 1);
            let mut sum = 0u32;
            let mut n = 0u32;
            for yy in y0..y1 {
                for xx in x0..x1 {
                    n += 1;
                    if yy >= 0 && xx >= 0 && (yy as usize) < sh && (xx as usize) < sw {
                        sum += src[yy as usize * sw + xx as usize] as u32;
                    }
                }
            }
            out.push(((sum + n / 2) / n.max(1)) as u8);
        }
    }
    out
}

/// Reads an IDX image file and its label file.
pub fn read_idx_pair(images: &Path, labels: &Path, name: &str) -> Result<Dataset> {
    let im = idx::read(images)?;
    let lb = idx::read(labels)?;
    let what = images.display().to_string();
    if im.dims.len() != 3 {
        return Err(Error::format(
            what,
            format!("images must have 3 dimensions, found {:?}", im.dims),
        ));
    }
    if lb.dims.len() != 1 || lb.dims[0] != im.dims[0] {
        return Err(Error::format(
            labels.display().to_string(),
            format!(
                "{} labels for {} images",
                lb.dims.first().copied().unwrap_or(0),
                im.dims[0]
            ),
        ));
    }
    if im.dims[1] == 0 || im.dims[2] == 0 {
        return Err(Error::format(what, "images have no pixels"));
    }
    Ok(Dataset {
        name: name.to_string(),
        channels: 1,
        height: im.dims[1],
        width: im.dims[2],
        images: im.data,
        labels: lb.data,
    })
}

/// Reads CIFAR-10 binary batches: records of one label byte (< 10) and 3072 pixel bytes
/// (3 x 32 x 32, channel-major).
pub fn read_cifar10(files: &[&Path]) -> Result<Dataset> {
    let mut all = Dataset {
        name: "cifar10".into(),
        channels: 3,
        height: 32,
        width: 32,
        images: Vec::new(),
        labels: Vec::new(),
    };
    for f in files {
        let bytes = std::fs::read(f).map_err(|e| Error::io(*f, e))?;
        let part = parse_cifar10(&bytes, &f.display().to_string())?;
        all.images.extend_from_slice(&part.images);
        all.labels.extend_from_slice(&part.labels);
    }
    Ok(all)
}

/// Parses the bytes of one CIFAR-10 binary batch; `what` names it in errors.
pub fn parse_cifar10(bytes: &[u8], what: &str) -> Result<Dataset> {
    const REC: usize = 1 + 3 * 32 * 32;
    if bytes.is_empty() || bytes.len() % REC != 0 {
        return Err(Error::format(
            what,
            format!(
                "{} bytes is not a whole number of 3073-byte CIFAR-10 records",
                bytes.len()
            ),
        ));
    }
    let mut images = Vec::with_capacity(bytes.len());
    let mut labels = Vec::with_capacity(bytes.len() / REC);
    for rec in bytes.chunks_exact(REC) {
        if rec[0] >= 10 {
            return Err(Error::format(
                what,
                format!("label {} is not a CIFAR-10 class (0-9)", rec[0]),
            ));
        }
        labels.push(rec[0]);
        images.extend_from_slice(&rec[1..]);
    }
    Ok(Dataset {
        name: "cifar10".into(),
        channels: 3,
        height: 32,
        width: 32,
        images,
        labels,
    })
}

/// Decodes one PNG or JPEG image (format sniffed from the bytes, size limits enforced
/// before allocation) and brings it to `size` x `size` with `channels` channels, planes
/// channel-major. `what` names it in errors.
pub fn decode_image(bytes: &[u8], what: &str, size: usize, channels: usize) -> Result<Vec<u8>> {
    let bad = |m: String| Error::format(what, m);
    let mut reader = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| bad(format!("cannot read image: {e}")))?;
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(16_384);
    limits.max_image_height = Some(16_384);
    limits.max_alloc = Some(512 << 20);
    reader.limits(limits);
    let decoded = reader
        .decode()
        .map_err(|e| bad(format!("cannot decode image: {e}")))?;
    let (w, h) = (decoded.width() as usize, decoded.height() as usize);
    if w == 0 || h == 0 {
        return Err(bad("image has no pixels".into()));
    }
    let planes: Vec<Vec<u8>> = if channels == 1 {
        vec![decoded.to_luma8().into_raw()]
    } else {
        let rgb = decoded.to_rgb8().into_raw();
        (0..3)
            .map(|c| rgb.iter().skip(c).step_by(3).copied().collect())
            .collect()
    };
    let mut out = Vec::with_capacity(channels * size * size);
    for plane in planes {
        out.extend(resize_plane(&plane, h, w, size, size));
    }
    Ok(out)
}

/// Reads a folder of PNG or JPEG images. Sub-folders are classes (sorted by name); images
/// directly in the folder get class 0. Every image is brought to `size` x `size` (centred
/// crop, box filter) with `channels` channels.
pub fn read_image_folder(dir: &Path, size: usize, channels: usize) -> Result<Dataset> {
    if channels != 1 && channels != 3 {
        return Err(Error::invalid("image folders load as 1 or 3 channels"));
    }
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    entries.sort();
    let mut files: Vec<(std::path::PathBuf, u8)> = Vec::new();
    let mut class = 0u8;
    let is_image = |p: &Path| {
        matches!(
            p.extension()
                .and_then(|e| e.to_str())
                .map(|e| e.to_ascii_lowercase())
                .as_deref(),
            Some("png" | "jpg" | "jpeg")
        )
    };
    for e in &entries {
        if e.is_dir() {
            let mut sub: Vec<_> = std::fs::read_dir(e)
                .map_err(|err| Error::io(e, err))?
                .filter_map(|x| x.ok().map(|x| x.path()))
                .filter(|p| is_image(p))
                .collect();
            sub.sort();
            if sub.is_empty() {
                continue;
            }
            if class == u8::MAX {
                return Err(Error::format(
                    dir.display().to_string(),
                    "more than 255 class folders",
                ));
            }
            files.extend(sub.into_iter().map(|p| (p, class)));
            class += 1;
        } else if is_image(e) {
            files.push((e.clone(), 0));
        }
    }
    if files.is_empty() {
        return Err(Error::format(
            dir.display().to_string(),
            "no .png or .jpg images found",
        ));
    }
    let mut ds = Dataset {
        name: dir.display().to_string(),
        channels,
        height: size,
        width: size,
        images: Vec::new(),
        labels: Vec::new(),
    };
    for (path, label) in files {
        let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
        ds.images.extend(decode_image(
            &bytes,
            &path.display().to_string(),
            size,
            channels,
        )?);
        ds.labels.push(label);
    }
    Ok(ds)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn centring_pads_and_box_filter_shrinks() {
        let ds = Dataset {
            name: "t".into(),
            channels: 1,
            height: 2,
            width: 2,
            images: vec![10, 20, 30, 40],
            labels: vec![0],
        };
        let big = ds.resized(4, 4).unwrap();
        assert_eq!(
            big.images,
            vec![0, 0, 0, 0, 0, 10, 20, 0, 0, 30, 40, 0, 0, 0, 0, 0]
        );
        let small = ds.resized(1, 1).unwrap();
        assert_eq!(small.images, vec![25]);
        let rgb = ds.with_channels(3).unwrap();
        assert_eq!(rgb.images.len(), 12);
        assert_eq!(rgb.with_channels(1).unwrap().images, ds.images);
    }
}
