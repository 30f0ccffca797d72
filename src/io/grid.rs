//! Sample grids as PNG files.

use std::path::Path;

use crate::error::{Error, Result};
use crate::nn::Shape;

/// A batch of images as generators write them: `count` images of `shape`, channel-major
/// ([count, c, h, w]), values in [-1, 1].
#[derive(Clone, Copy, Debug)]
pub struct Images<'a> {
    pub values: &'a [f32],
    pub count: usize,
    pub shape: Shape,
}

impl Images<'_> {
    fn dims(&self) -> [usize; 4] {
        [self.count, self.shape.c, self.shape.h, self.shape.w]
    }
}

/// Writes the images as a grid of `cols` columns with a 2-pixel dark border between them.
/// Grey for one channel, RGB for three.
pub fn write_grid(path: &Path, images: &Images, cols: usize) -> Result<()> {
    write_tiled(path, images.values, images.dims(), cols, 2)
}

/// The grid writer behind both entry points: `pad` dark pixels around and between tiles.
/// One-channel images are written as 8-bit grey PNGs, three-channel ones as RGB.
fn write_tiled(
    path: &Path,
    images: &[f32],
    [n, c, h, w]: [usize; 4],
    cols: usize,
    pad: usize,
) -> Result<()> {
    check_drawable(Shape { c, h, w })?;
    if n == 0 || images.len() != n * c * h * w {
        return Err(Error::invalid(format!(
            "cannot draw {n} images of {c}x{h}x{w} from {} values",
            images.len()
        )));
    }
    let cols = cols.clamp(1, n);
    let rows = n.div_ceil(cols);
    let (gw, gh) = (cols * (w + pad) + pad, rows * (h + pad) + pad);
    let mut pixels = vec![24u8; gw * gh * c];
    for i in 0..n {
        let (gy, gx) = ((i / cols) * (h + pad) + pad, (i % cols) * (w + pad) + pad);
        for y in 0..h {
            for x in 0..w {
                for ch in 0..c {
                    let v = images[((i * c + ch) * h + y) * w + x];
                    let byte = ((v.clamp(-1.0, 1.0) + 1.0) * 127.5).round() as u8;
                    pixels[((gy + y) * gw + gx + x) * c + ch] = byte;
                }
            }
        }
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    let tmp = path.with_extension("png.part");
    let colour = if c == 1 {
        image::ExtendedColorType::L8
    } else {
        image::ExtendedColorType::Rgb8
    };
    let written = image::save_buffer_with_format(
        &tmp,
        &pixels,
        gw as u32,
        gh as u32,
        colour,
        image::ImageFormat::Png,
    )
    .map_err(|e| Error::io(&tmp, std::io::Error::other(e)));
    super::commit_part(&tmp, path, written)
}

/// Refuses, before anything is generated, images that a PNG cannot show: one channel (grey)
/// or three (RGB), a picture at least 1 x 1.
pub fn check_drawable(s: Shape) -> Result<()> {
    if (s.c != 1 && s.c != 3) || s.h == 0 || s.w == 0 {
        return Err(Error::invalid(format!(
            "the model's images are {}x{}x{} (channels x height x width); PNG files show 1 \
             channel (grey) or 3 (RGB): use --raw FILE.npy for the values",
            s.c, s.h, s.w
        )));
    }
    Ok(())
}

/// Writes image `index` as `dir/NNNNN.png` (at least five digits), exactly h x w pixels.
pub fn write_image_at(dir: &Path, values: &[f32], shape: Shape, index: usize) -> Result<()> {
    write_tiled(
        &dir.join(format!("{index:05}.png")),
        values,
        [1, shape.c, shape.h, shape.w],
        1,
        0,
    )
}

/// Writes one image per file into a folder: 00000.png, 00001.png, ..., each exactly h x w
/// pixels (no border), so the files can be fed to other tools as they are.
pub fn write_images(dir: &Path, images: &Images) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let per = images.shape.len();
    for i in 0..images.count {
        write_image_at(dir, &images.values[i * per..(i + 1) * per], images.shape, i)?;
    }
    Ok(())
}

/// Writes the images' float values as a NumPy `.npy` file of float32, shape [count, c, h, w]
/// (what `prism sample --raw` writes: the generator's output before any rounding to pixels).
pub fn write_npy(path: &Path, images: &Images) -> Result<()> {
    let mut out = NpyStream::create(path, images.count, images.shape)?;
    out.push(images.values)?;
    out.finish()
}

/// A `.npy` file of float32 [count, c, h, w] written a batch at a time (`prism sample --raw`
/// streams): into `FILE.npy.part`, renamed when all `count` images are in; dropped unfinished,
/// the part file is removed.
pub struct NpyStream {
    path: std::path::PathBuf,
    tmp: std::path::PathBuf,
    values_left: u64,
    out: Option<npyz::NpyWriter<f32, std::io::BufWriter<std::fs::File>>>,
}

impl NpyStream {
    pub fn create(path: &Path, count: usize, shape: Shape) -> Result<NpyStream> {
        use npyz::WriterBuilder;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        }
        let tmp = path.with_extension("npy.part");
        let io = |e: std::io::Error| Error::io(&tmp, e);
        let file = std::fs::File::create(&tmp).map_err(io)?;
        let dims = [count as u64, shape.c as u64, shape.h as u64, shape.w as u64];
        let values_left = dims
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .ok_or_else(|| Error::invalid(format!("{count} images of {shape:?}: too many")))?;
        let out = npyz::WriteOptions::new()
            .default_dtype()
            .shape(&dims)
            .writer(std::io::BufWriter::new(file))
            .begin_nd();
        let mut s = NpyStream {
            path: path.to_path_buf(),
            tmp: tmp.clone(),
            values_left,
            out: None,
        };
        s.out = Some(out.map_err(|e| Error::io(&tmp, e))?);
        Ok(s)
    }

    /// Appends images' values ([k, c, h, w]).
    pub fn push(&mut self, values: &[f32]) -> Result<()> {
        if values.len() as u64 > self.values_left {
            return Err(Error::invalid(
                "more image values than the .npy file's shape",
            ));
        }
        self.values_left -= values.len() as u64;
        let out = self
            .out
            .as_mut()
            .expect("an unfinished stream has its writer");
        out.extend(values.iter().copied())
            .map_err(|e| Error::io(&self.tmp, e))
    }

    /// Closes the file and gives it its name; every image must have been pushed.
    pub fn finish(mut self) -> Result<()> {
        if self.values_left != 0 {
            return Err(Error::invalid(format!(
                "{} image values missing from {}",
                self.values_left,
                self.path.display()
            )));
        }
        let out = self
            .out
            .take()
            .expect("an unfinished stream has its writer");
        let written = out.finish().map_err(|e| Error::io(&self.tmp, e));
        super::commit_part(&self.tmp, &self.path, written)
    }
}

impl Drop for NpyStream {
    fn drop(&mut self) {
        if self.out.is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_images_have_no_border_and_keep_their_values() {
        let dir = std::env::temp_dir().join(format!("prism-grid-{}", std::process::id()));
        // Two grey 3x2 images with distinct values in [-1, 1].
        let imgs: Vec<f32> = (0..12).map(|i| i as f32 / 11.0 * 2.0 - 1.0).collect();
        let batch = Images {
            values: &imgs,
            count: 2,
            shape: Shape { c: 1, h: 3, w: 2 },
        };
        write_images(&dir, &batch).unwrap();
        let second = image::open(dir.join("00001.png")).unwrap();
        assert_eq!((second.width(), second.height()), (2, 3));
        let grey = second.to_luma8();
        let want: Vec<u8> = imgs[6..]
            .iter()
            .map(|v| ((v + 1.0) * 127.5).round() as u8)
            .collect();
        assert_eq!(grey.as_raw(), &want);
        write_grid(&dir.join("grid.png"), &batch, 2).unwrap();
        let grid = image::open(dir.join("grid.png")).unwrap();
        assert_eq!((grid.width(), grid.height()), (2 * 4 + 2, 3 + 4));
        // The raw values: a .npy header of float32 [2, 1, 3, 2], then the values as they are.
        write_npy(&dir.join("raw.npy"), &batch).unwrap();
        let raw = std::fs::read(dir.join("raw.npy")).unwrap();
        assert_eq!(&raw[..6], b"\x93NUMPY");
        let header = String::from_utf8_lossy(&raw[10..raw.len() - 48]).to_string();
        assert!(
            header.contains("'<f4'") && header.contains("(2, 1, 3, 2"),
            "{header}"
        );
        let values: Vec<f32> = raw[raw.len() - 48..]
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        assert_eq!(values, imgs);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
