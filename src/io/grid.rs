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
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
