//! Sample grids as PNG files.

use std::path::Path;

use crate::error::{Error, Result};

/// Writes `n` images [n, c, h, w] with values in [-1, 1] as a grid of `cols` columns with a
/// 2-pixel dark border between images. Grey for one channel, RGB for three.
pub fn write_grid(
    path: &Path,
    images: &[f32],
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    cols: usize,
) -> Result<()> {
    if n == 0 || (c != 1 && c != 3) || images.len() != n * c * h * w {
        return Err(Error::invalid(format!(
            "cannot draw {n} images of {c}x{h}x{w} from {} values",
            images.len()
        )));
    }
    let cols = cols.clamp(1, n);
    let rows = n.div_ceil(cols);
    let pad = 2;
    let (gw, gh) = (cols * (w + pad) + pad, rows * (h + pad) + pad);
    let mut rgb = vec![24u8; gw * gh * 3];
    for i in 0..n {
        let (gy, gx) = ((i / cols) * (h + pad) + pad, (i % cols) * (w + pad) + pad);
        for y in 0..h {
            for x in 0..w {
                for ch in 0..3 {
                    let src = if c == 1 { 0 } else { ch };
                    let v = images[((i * c + src) * h + y) * w + x];
                    let byte = ((v.clamp(-1.0, 1.0) + 1.0) * 127.5).round() as u8;
                    rgb[((gy + y) * gw + gx + x) * 3 + ch] = byte;
                }
            }
        }
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    let tmp = path.with_extension("png.part");
    image::save_buffer_with_format(
        &tmp,
        &rgb,
        gw as u32,
        gh as u32,
        image::ExtendedColorType::Rgb8,
        image::ImageFormat::Png,
    )
    .map_err(|e| Error::io(&tmp, std::io::Error::other(e)))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// Writes one image per file into a folder: 00000.png, 00001.png, ...
pub fn write_images(
    dir: &Path,
    images: &[f32],
    n: usize,
    c: usize,
    h: usize,
    w: usize,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let per = c * h * w;
    for i in 0..n {
        write_grid(
            &dir.join(format!("{i:05}.png")),
            &images[i * per..(i + 1) * per],
            1,
            c,
            h,
            w,
            1,
        )?;
    }
    Ok(())
}
