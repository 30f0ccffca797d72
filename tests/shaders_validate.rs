//! Every shader variant the launchers can request renders from its template and passes naga's
//! validation. Needs no GPU.

use prism::gpu::shader::{capabilities, compile, ShaderKey, SOURCES};

/// Device-wide variants: (row_share, subgroups capability, f16).
const DEVICE: &[(&str, bool, bool)] = &[
    ("broadcast", true, true),
    ("shuffle", true, false),
    ("direct", false, false),
];

fn check(key: ShaderKey) {
    for &(share, sg, f16) in DEVICE {
        // f16 arithmetic only where the device has shader f16.
        let halves: &[bool] = if f16 { &[false, true] } else { &[false] };
        for &half in halves {
            let k = key
                .clone()
                .def("row_share", share)
                .def("subgroups", sg)
                .def("f16", f16)
                .def("half", half);
            if let Err(e) = compile(&k, capabilities(sg, f16)) {
                panic!("{e}");
            }
        }
    }
}

#[test]
fn matmul_variants_validate() {
    for source in ["dense", "train", "packed", "frozen"] {
        for rows in [8u32, 32] {
            for aligned in [false, true] {
                check(
                    ShaderKey::new("masked_matmul.wgsl")
                        .def("source", source)
                        .def("rows", rows)
                        .def("aligned", aligned),
                );
            }
        }
    }
    // The score gradient with Adam in its epilogue (aligned shapes only).
    for rows in [8u32, 32] {
        check(
            ShaderKey::new("masked_matmul.wgsl")
                .def("source", "frozen")
                .def("rows", rows)
                .def("aligned", true)
                .def("adam", true),
        );
    }
    // The Gram matrix's lower-triangle forward (the MMD's).
    for rows in [8u32, 32] {
        for aligned in [false, true] {
            check(
                ShaderKey::new("masked_matmul.wgsl")
                    .def("source", "dense")
                    .def("rows", rows)
                    .def("aligned", aligned)
                    .def("lower", true),
            );
        }
    }
}

#[test]
fn conv_variants_validate() {
    for source in ["dense", "train", "packed", "frozen"] {
        for rows in [8u32, 32] {
            for aligned in [false, true] {
                for unit_stride in [false, true] {
                    check(
                        ShaderKey::new("masked_conv.wgsl")
                            .def("source", source)
                            .def("rows", rows)
                            .def("aligned", aligned)
                            .def("unit_stride", unit_stride),
                    );
                }
            }
        }
    }
}

#[test]
fn weight_mask_and_adam_kernels_validate() {
    for source in ["dense", "train", "packed", "frozen"] {
        check(
            ShaderKey::new("weights.wgsl")
                .def("standalone", true)
                .def("source", source),
        );
    }
    check(ShaderKey::new("mask.wgsl"));
    check(ShaderKey::new("norm.wgsl"));
    check(ShaderKey::new("pool.wgsl"));
    check(ShaderKey::new("moments.wgsl"));
    // Streaming kernels in both forms: one vector per invocation (GPUs) and eight (CPU
    // adapters).
    for vectors in [1u32, 8] {
        check(ShaderKey::new("elementwise.wgsl").def("vectors", vectors));
        check(ShaderKey::new("adam.wgsl").def("quads", vectors));
        check(ShaderKey::new("mmd.wgsl").def("vectors", vectors));
        check(ShaderKey::new("data.wgsl").def("vectors", vectors));
    }
}

#[test]
fn every_shader_file_is_listed_and_exists() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("shaders");
    let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".wgsl"))
        .collect();
    on_disk.sort();
    let mut listed: Vec<String> = SOURCES.iter().map(|(n, _)| n.to_string()).collect();
    listed.sort();
    assert_eq!(
        on_disk, listed,
        "shaders/ and gpu::shader::SOURCES disagree"
    );
}
