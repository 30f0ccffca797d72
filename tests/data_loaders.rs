//! Dataset readers on fixtures the tests make themselves (no CIFAR-10 or image folders are
//! available offline), and their errors on malformed files; plus the real MNIST files.

use std::path::{Path, PathBuf};

use prism::data::locate::{self, Named, Split};
use prism::data::{idx, read_cifar10, read_idx_pair, read_image_folder};
use prism::Error;

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("prism-data-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn gz(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

#[test]
fn idx_pairs_raw_and_gzipped() {
    let d = tmp("idx");
    let images: Vec<u8> = (0..3 * 4 * 5).map(|i| i as u8).collect();
    std::fs::write(d.join("i.gz"), gz(&idx::encode(&[3, 4, 5], &images))).unwrap();
    std::fs::write(d.join("l"), idx::encode(&[3], &[7, 1, 2])).unwrap();
    let ds = read_idx_pair(&d.join("i.gz"), &d.join("l"), "t").unwrap();
    assert_eq!((ds.len(), ds.height, ds.width, ds.channels), (3, 4, 5, 1));
    assert_eq!(ds.labels, vec![7, 1, 2]);
    assert_eq!(ds.image(1), &images[20..40]);
    // Label count mismatch, truncated images, not gzip though named so.
    std::fs::write(d.join("l2"), idx::encode(&[2], &[0, 1])).unwrap();
    assert!(read_idx_pair(&d.join("i.gz"), &d.join("l2"), "t")
        .unwrap_err()
        .to_string()
        .contains("labels for 3 images"));
    std::fs::write(d.join("short"), &idx::encode(&[3, 4, 5], &images)[..30]).unwrap();
    assert!(matches!(
        read_idx_pair(&d.join("short"), &d.join("l"), "t"),
        Err(Error::Format { .. })
    ));
    std::fs::write(d.join("fake.gz"), [0x1f, 0x8b, 0, 0, 1, 2, 3]).unwrap();
    assert!(read_idx_pair(&d.join("fake.gz"), &d.join("l"), "t")
        .unwrap_err()
        .to_string()
        .contains("gzip"));
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn cifar10_binary_batches() {
    let d = tmp("cifar");
    let mut rec = Vec::new();
    for k in 0..4u8 {
        rec.push(k % 10);
        rec.extend((0..3072).map(|i| (i as u8).wrapping_add(k)));
    }
    std::fs::write(d.join("data_batch_1.bin"), &rec[..2 * 3073]).unwrap();
    std::fs::write(d.join("data_batch_2.bin"), &rec[2 * 3073..]).unwrap();
    let files = [d.join("data_batch_1.bin"), d.join("data_batch_2.bin")];
    let refs: Vec<&Path> = files.iter().map(|p| p.as_path()).collect();
    let ds = read_cifar10(&refs).unwrap();
    assert_eq!((ds.len(), ds.channels, ds.height, ds.width), (4, 3, 32, 32));
    assert_eq!(ds.labels, vec![0, 1, 2, 3]);
    assert_eq!(ds.image(3)[0], 3);
    // Partial record, bad label.
    std::fs::write(d.join("bad.bin"), &rec[..3000]).unwrap();
    assert!(read_cifar10(&[&d.join("bad.bin")])
        .unwrap_err()
        .to_string()
        .contains("3073-byte"));
    let mut bad_label = rec[..3073].to_vec();
    bad_label[0] = 10;
    std::fs::write(d.join("bad2.bin"), &bad_label).unwrap();
    assert!(read_cifar10(&[&d.join("bad2.bin")])
        .unwrap_err()
        .to_string()
        .contains("label 10"));
    // Found as a named dataset through --data.
    std::fs::write(d.join("data_batch_3.bin"), &rec[..3073]).unwrap();
    std::fs::write(d.join("data_batch_4.bin"), &rec[..3073]).unwrap();
    std::fs::write(d.join("data_batch_5.bin"), &rec[..3073]).unwrap();
    std::fs::write(d.join("test_batch.bin"), &rec[..3073]).unwrap();
    let found = locate::load(Named::Cifar10, Some(&d), Split::Train, false).unwrap();
    assert_eq!(found.len(), 7);
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn image_folders_with_classes_sizes_and_formats() {
    let d = tmp("folder");
    for (class, n) in [("cats", 2usize), ("dogs", 3)] {
        std::fs::create_dir_all(d.join(class)).unwrap();
        for i in 0..n {
            let (w, h) = (20 + 7 * i as u32, 16 + 3 * i as u32);
            let img = image::RgbImage::from_fn(w, h, |x, y| {
                image::Rgb([(x * 7) as u8, (y * 13) as u8, 200])
            });
            let ext = if i == 1 { "jpg" } else { "png" };
            img.save(d.join(class).join(format!("{i}.{ext}"))).unwrap();
        }
    }
    std::fs::write(d.join("notes.txt"), "ignored").unwrap();
    let ds = read_image_folder(&d, 8, 3).unwrap();
    assert_eq!((ds.len(), ds.channels, ds.height, ds.width), (5, 3, 8, 8));
    assert_eq!(ds.labels, vec![0, 0, 1, 1, 1]);
    // Blue is 200 everywhere in the fixtures (JPEG is lossy: allow a little).
    let blue = &ds.image(0)[128..192];
    assert!(blue.iter().all(|&v| (190..=210).contains(&v)), "{blue:?}");
    let grey = read_image_folder(&d, 4, 1).unwrap();
    assert_eq!(grey.image_len(), 16);
    // A corrupt image is an error naming the file.
    std::fs::write(d.join("dogs/9.png"), b"\x89PNG\r\n\x1a\n not really").unwrap();
    let e = read_image_folder(&d, 8, 3).unwrap_err().to_string();
    assert!(e.contains("9.png"), "{e}");
    assert!(read_image_folder(&tmp("empty"), 8, 3).is_err());
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn real_mnist_and_fashion_mnist_load() {
    let base = std::env::var_os("PRISM_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data"));
    for (named, classes) in [(Named::Mnist, 10), (Named::FashionMnist, 10)] {
        let train =
            locate::load(named, Some(&base), Split::Train, false).unwrap_or_else(|e| panic!("{e}"));
        let test = locate::load(named, Some(&base), Split::Test, false).unwrap();
        assert_eq!(
            (train.len(), test.len(), train.height, train.width),
            (60_000, 10_000, 28, 28)
        );
        assert_eq!(train.classes(), classes);
        let padded = test.take(3).resized(32, 32).unwrap();
        assert_eq!(padded.image(0)[0], 0);
        assert_eq!(
            padded.image(0)[2 * 32 + 2..2 * 32 + 30],
            test.image(0)[..28]
        );
    }
    // A named folder without the data is an error, whatever else this machine holds (./data,
    // $PRISM_DATA, the cache): it is the only place looked at.
    let missing = Path::new("/nonexistent");
    assert_eq!(locate::search_dirs(Some(missing)), [missing.to_path_buf()]);
    match locate::load(Named::Mnist, Some(missing), Split::Train, false) {
        Ok(d) => panic!("{} images loaded from /nonexistent", d.len()),
        Err(e) => assert!(matches!(e, Error::DataNotFound(_)), "{e}"),
    }
}
