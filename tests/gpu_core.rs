//! The GPU layer's promises: refusals before the driver, typed errors, pipeline and buffer
//! reuse, and the core kernels on every adapter the machine has.

mod common;

use common::{assert_close, normal, uniform};
use prism::gpu::{DType, Gpu, GpuOptions};
use prism::kernels::matmul::{self, LinearShape};
use prism::kernels::weights::{cpu as wcpu, Init, MaskSource};
use prism::kernels::{mask, norm, Product, StepState};
use prism::rng::HostRng;
use prism::{Error, GpuError};

/// Adapters and kernels known to fail, as (adapter name fragment, backend, kernel, reason).
/// Empty: every kernel passes on every adapter seen so far (lavapipe on Vulkan, llvmpipe on GL).
const KNOWN_FAILURES: &[(&str, &str, &str, &str)] = &[];

fn known_failure(gpu: &Gpu, kernel: &str) -> bool {
    let info = gpu.info();
    KNOWN_FAILURES.iter().any(|(name, backend, k, _)| {
        info.name.contains(name) && format!("{:?}", info.backend) == *backend && *k == kernel
    })
}

#[test]
fn core_kernels_run_on_every_adapter() {
    let gpus = Gpu::all(None);
    assert!(
        !gpus.is_empty(),
        "no adapter at all: see tests/common/mod.rs for how to install one"
    );
    let mut rng = HostRng::new(51, &[]);
    for g in gpus {
        let gpu = g.unwrap_or_else(|e| panic!("an adapter failed to open: {e}"));
        let s = LinearShape {
            batch: 9,
            inputs: 36,
            outputs: 20,
        };
        let layer = common::layer(4, 1, Init::SignedConstant, 36);
        let scores = normal(&mut rng, s.weights());
        let keep_cpu = mask::cpu::thresholds(&scores);
        let step = StepState {
            client: 1,
            step: 2,
            round: 0,
            seed: 4,
            ..Default::default()
        };
        let keep = gpu
            .upload_u32(&keep_cpu, &[keep_cpu.len()], "keep")
            .unwrap();
        let st = gpu
            .upload_u32(bytemuck::cast_slice(&[step]), &[8], "step")
            .unwrap();
        let x = uniform(&mut rng, s.batch * s.inputs);
        let tx = gpu.upload_f32(&x, &[x.len()], "x").unwrap();
        let ty = gpu.tensor(&[s.batch * s.outputs], DType::F32, "y").unwrap();
        let name = prism::gpu::describe_adapter(gpu.info());
        if !known_failure(&gpu, "masked_matmul") {
            let k = matmul::forward(
                &gpu,
                &s,
                &Product::new(
                    &layer,
                    &MaskSource::Train {
                        keep: &keep,
                        step: &st,
                    },
                    &tx,
                    &ty,
                ),
            )
            .unwrap();
            gpu.run(&[&k]).unwrap();
            let weff = wcpu::effective(
                &layer,
                s.weights(),
                &wcpu::Source::Train {
                    keep: &keep_cpu,
                    step,
                },
            );
            assert_close(
                &format!("matmul on {name}"),
                &gpu.read_f32(&ty).unwrap(),
                &matmul::cpu::forward(&s, &x, &weff),
                1e-5,
                1e-4,
            );
        }
        if !known_failure(&gpu, "norm") {
            let ns = norm::NormShape {
                batch: s.batch,
                channels: s.outputs,
                size: 1,
            };
            let tn = gpu.tensor(&[ns.len()], DType::F32, "n").unwrap();
            let tst = gpu.tensor(&[2 * ns.channels], DType::F32, "st").unwrap();
            gpu.run(&[&norm::forward(&gpu, &ns, &ty, &tn, &tst).unwrap()])
                .unwrap();
            let (want, _) = norm::cpu::forward(&ns, &gpu.read_f32(&ty).unwrap());
            assert_close(
                &format!("batchnorm on {name}"),
                &gpu.read_f32(&tn).unwrap(),
                &want,
                1e-4,
                1e-3,
            );
        }
        if !known_failure(&gpu, "mask") {
            let n = 1000;
            let k = mask::cpu::thresholds(&normal(&mut rng, n));
            let tk = gpu.upload_u32(&k, &[k.len()], "k").unwrap();
            let bits = gpu
                .tensor(&[mask::packed_words(n)], DType::U32, "bits")
                .unwrap();
            gpu.run(&[&mask::sample_packed(&gpu, n, &tk, 77, &bits).unwrap()])
                .unwrap();
            assert_eq!(
                gpu.read_u32(&bits).unwrap(),
                mask::cpu::sample_packed(n, &k, 77),
                "mask on {name}"
            );
        }
    }
}

#[test]
fn bindings_beyond_the_limit_are_refused_before_the_driver() {
    let base = common::gpu();
    let mut limits = base.limits().clone();
    limits.max_storage_buffer_binding_size = 1 << 16;
    let gpu = Gpu::new(GpuOptions {
        limits: Some(limits),
        ..Default::default()
    })
    .unwrap();
    let s = LinearShape {
        batch: 64,
        inputs: 512,
        outputs: 8,
    }; // x: 128 KiB
    let layer = common::layer(1, 0, Init::SignedConstant, 512);
    let x = gpu.zeros(&[s.batch * s.inputs], DType::F32, "x").unwrap();
    let y = gpu.zeros(&[s.batch * s.outputs], DType::F32, "y").unwrap();
    match matmul::forward(&gpu, &s, &Product::new(&layer, &MaskSource::Frozen, &x, &y)) {
        Err(Error::Gpu(GpuError::BindingTooLarge { bytes, limit, .. })) => {
            assert_eq!(bytes, 131_072);
            assert_eq!(limit, 65_536);
        }
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("an over-limit binding was accepted"),
    }
}

#[test]
fn buffers_beyond_the_limit_are_refused() {
    let gpu = common::gpu();
    let too_big = gpu.limits().max_buffer_size / 4 + 1;
    match gpu.tensor(&[too_big as usize], DType::F32, "huge") {
        Err(GpuError::BufferTooLarge { what, .. }) => assert_eq!(what, "huge"),
        other => panic!("expected BufferTooLarge, got {other:?}"),
    }
    let msg = GpuError::BufferTooLarge {
        what: "x".into(),
        bytes: 1,
        limit: 0,
    }
    .to_string();
    assert!(msg.contains("at most"), "{msg}");
}

#[test]
fn a_lost_device_is_a_typed_error() {
    let gpu = Gpu::new(GpuOptions::default()).unwrap();
    let t = gpu.upload_f32(&[1.0, 2.0], &[2], "t").unwrap();
    gpu.device().destroy();
    let err = gpu
        .read_f32(&t)
        .expect_err("reading from a destroyed device must fail");
    assert!(matches!(err, GpuError::DeviceLost { .. }), "{err:?}");
    assert!(err.to_string().contains("Restart the program"), "{err}");
}

#[test]
fn pipelines_and_buffers_are_reused() {
    let gpu = Gpu::new(GpuOptions::default()).unwrap();
    let s = LinearShape {
        batch: 16,
        inputs: 32,
        outputs: 24,
    };
    let layer = common::layer(2, 0, Init::SignedConstant, 32);
    let build_and_run = || {
        let x = gpu.zeros(&[s.batch * s.inputs], DType::F32, "x").unwrap();
        let y = gpu.tensor(&[s.batch * s.outputs], DType::F32, "y").unwrap();
        let k =
            matmul::forward(&gpu, &s, &Product::new(&layer, &MaskSource::Frozen, &x, &y)).unwrap();
        gpu.run(&[&k]).unwrap();
    };
    build_and_run();
    let (pipelines, allocs) = (gpu.pipelines_compiled(), gpu.pool_stats().allocations);
    for _ in 0..5 {
        build_and_run();
    }
    assert_eq!(
        gpu.pipelines_compiled(),
        pipelines,
        "a repeated launch compiled a pipeline"
    );
    assert_eq!(
        gpu.pool_stats().allocations,
        allocs,
        "a repeated launch allocated a buffer"
    );
    assert_eq!(
        gpu.pool_stats().live_bytes,
        0,
        "tensors went back to the pool"
    );
}

#[test]
fn missing_or_unknown_bindings_are_clear_errors() {
    let gpu = common::gpu();
    let x = gpu.zeros(&[4], DType::F32, "x").unwrap();
    let key = || prism::gpu::shader::ShaderKey::new("elementwise.wgsl");
    let params = [4u32, 0, 0, 0, 0, 0, 0, 0];
    let no_params = gpu
        .kernel(key(), "transpose")
        .bind("a", &x)
        .bind("out", &x)
        .groups(1)
        .build();
    assert!(no_params
        .err()
        .unwrap()
        .to_string()
        .contains("parameters `p`"));
    let missing = gpu
        .kernel(key(), "transpose")
        .params(&params)
        .bind("a", &x)
        .groups(1)
        .build();
    assert!(missing
        .err()
        .unwrap()
        .to_string()
        .contains("no buffer bound to `out`"));
    let unknown = gpu
        .kernel(key(), "transpose")
        .params(&params)
        .bind("a", &x)
        .bind("out", &x)
        .bind("oops", &x)
        .groups(1)
        .build();
    assert!(unknown
        .err()
        .unwrap()
        .to_string()
        .contains("no binding named `oops`"));
    let entry = gpu.kernel(key(), "no_such_entry").groups(1).build();
    assert!(entry
        .err()
        .unwrap()
        .to_string()
        .contains("no entry point named no_such_entry"));
}

/// The adapter matrix (`.ci/matrix`) runs the GPU tests once per adapter form and says which
/// form it asked for: `PRISM_EXPECT_FORM=backend/row_share` (e.g. `Vulkan/shuffle`, `Gl/direct`).
/// A form that silently fell back to another (an environment variable a driver ignored) would
/// test the default twice; this fails instead. Without the variable there is nothing to check.
#[test]
fn the_adapter_form_is_the_one_the_matrix_asked_for() {
    let gpu = common::gpu();
    // Whatever the form: the row sharing is the one the selection rule gives for the
    // adapter's subgroups (none where the device was opened portable).
    let f = gpu.features();
    assert_eq!(
        f.row_share,
        prism::gpu::RowShare::for_subgroups(f.subgroups),
        "{:?}",
        f.subgroups
    );
    let Ok(want) = std::env::var("PRISM_EXPECT_FORM") else {
        return;
    };
    let got = format!(
        "{:?}/{}",
        gpu.info().backend,
        gpu.features().row_share.as_str()
    );
    assert_eq!(
        got,
        want,
        "adapter {} ({:?} subgroups)",
        gpu.info().name,
        gpu.features().subgroups
    );
}
