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
    if n == 0 || (c != 1 && c != 3) || images.len() != n * c * h * w {
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
    image::save_buffer_with_format(
        &tmp,
        &pixels,
        gw as u32,
        gh as u32,
        colour,
        image::ImageFormat::Png,
    )
    .map_err(|e| Error::io(&tmp, std::io::Error::other(e)))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// Writes one image per file into a folder: 00000.png, 00001.png, ..., each exactly h x w
/// pixels (no border), so the files can be fed to other tools as they are.
pub fn write_images(dir: &Path, images: &Images) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let [n, c, h, w] = images.dims();
    let (images, per) = (images.values, c * h * w);
    for i in 0..n {
        write_tiled(
            &dir.join(format!("{i:05}.png")),
            &images[i * per..(i + 1) * per],
            [1, c, h, w],
            1,
            0,
        )?;
    }
    Ok(())
}

/// Writes the images' float values as a NumPy `.npy` file of float32, shape [count, c, h, w]
/// (what `prism sample --raw` writes: the generator's output before any rounding to pixels).
pub fn write_npy(path: &Path, images: &Images) -> Result<()> {
    use npyz::WriterBuilder;
    let [n, c, h, w] = images.dims();
    if images.values.len() != n * c * h * w {
        return Err(Error::invalid("image values do not match their shape"));
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    let tmp = path.with_extension("npy.part");
    let io = |e: std::io::Error| Error::io(&tmp, e);
    let file = std::fs::File::create(&tmp).map_err(io)?;
    let mut out = npyz::WriteOptions::new()
        .default_dtype()
        .shape(&[n as u64, c as u64, h as u64, w as u64])
        .writer(std::io::BufWriter::new(file))
        .begin_nd()
        .map_err(io)?;
    out.extend(images.values.iter().copied()).map_err(io)?;
    out.finish().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
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
