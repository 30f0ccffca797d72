//! The GPU layer: adapter choice, device features and limits, typed errors, shader assembly,
//! the pipeline cache, the buffer pool and kernel launches.
//!
//! Everything above this module talks to the GPU through [`Gpu`], [`Kernel`] and [`Tensor`].

mod buffer;
mod kernel;
mod pipeline;
mod pool;
pub mod shader;
mod timing;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

pub use buffer::{DType, Tensor};
pub use kernel::{fold_workgroups, Kernel, KernelBuilder};
pub use pool::{PoolStats, PooledBuffer};
pub use timing::Clock;

use crate::error::GpuError;
use pipeline::PipelineCache;
use pool::BufferPool;
use shader::{Def, ShaderKey};

/// How the rows of a matmul tile are shared between the 8 lanes of an octet (see
/// `shaders/masked_matmul.wgsl`). Chosen from the adapter's subgroup support.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RowShare {
    /// `subgroupBroadcast` with constant lane ids: subgroups of exactly 8 lanes (lavapipe on
    /// AVX2, some Intel GPUs). The fastest form where it applies.
    Broadcast,
    /// `subgroupShuffle` within each group of 8 lanes: any subgroup size that is a multiple of 8.
    Shuffle,
    /// Every lane loads the rows itself (same address across the octet): no subgroups needed
    /// (the GL backend, WebGPU without subgroups).
    Direct,
}

impl RowShare {
    /// The form for an adapter's subgroup sizes (min, max), None without subgroups. An octet's
    /// 8 lanes must lie in one subgroup, at lanes 8k .. 8k+7 (the kernels place lanes by
    /// subgroup id and lane): `subgroupBroadcast` with constant ids needs subgroups of exactly
    /// 8; `subgroupShuffle` inside each group of 8 needs every size the adapter may pick to be
    /// a multiple of 8 (Vulkan picks powers of two between min and max, so min >= 8 and both
    /// multiples of 8 suffice; a subgroup larger than the 64-lane workgroup holds it whole).
    /// Anything else (sizes 1 to 4, a range reaching below 8, sizes not multiples of 8) shares
    /// nothing: every lane loads its rows itself, which is correct on any adapter.
    pub fn for_subgroups(sizes: Option<(u32, u32)>) -> RowShare {
        match sizes {
            Some((8, 8)) => RowShare::Broadcast,
            Some((min, max)) if min >= 8 && min <= max && min % 8 == 0 && max % 8 == 0 => {
                RowShare::Shuffle
            }
            _ => RowShare::Direct,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            RowShare::Broadcast => "broadcast",
            RowShare::Shuffle => "shuffle",
            RowShare::Direct => "direct",
        }
    }
}

/// Optional capabilities the kernels can use, as detected on the adapter.
#[derive(Clone, Debug)]
pub struct KernelFeatures {
    /// Subgroup operations, with the adapter's (min, max) subgroup size.
    pub subgroups: Option<(u32, u32)>,
    /// 16-bit floats in shaders.
    pub shader_f16: bool,
    /// GPU timestamps for benchmarks.
    pub timestamps: bool,
    /// How matmul kernels share rows.
    pub row_share: RowShare,
    /// Vectors of four values that each invocation of a streaming kernel (Adam, elementwise)
    /// handles: 8 on CPU adapters, where an invocation has a fixed cost (llvmpipe runs a
    /// workgroup as a loop over its SIMD lanes; Adam ran 2.5 times faster with 8 than with 1),
    /// 1 on GPUs, which want many invocations in flight to hide memory latency.
    pub vectors_per_invocation: u32,
}

/// Options for opening a [`Gpu`].
#[derive(Clone, Debug, Default)]
pub struct GpuOptions {
    /// Restrict the backends (otherwise all, or `WGPU_BACKEND`).
    pub backends: Option<wgpu::Backends>,
    /// Pick the adapter whose name contains this (case-insensitive); otherwise
    /// `WGPU_ADAPTER_NAME`, otherwise the best adapter (a real GPU before a software one).
    pub adapter_name: Option<String>,
    /// Use only the portable kernel forms: no subgroups, no f16 (what the GL backend gets).
    pub portable: bool,
    /// Open the device with these limits instead of the adapter's own (tests lower them on
    /// purpose to exercise splitting and refusals). Must not exceed the adapter's.
    pub limits: Option<wgpu::Limits>,
    /// Override `KernelFeatures::vectors_per_invocation` (tests run both forms anywhere).
    pub vectors_per_invocation: Option<u32>,
}

/// Collects errors that wgpu reports asynchronously, so that they surface as typed errors at
/// the next synchronisation point instead of panicking inside wgpu's default handler.
#[derive(Default)]
pub(crate) struct ErrorSink {
    first: Mutex<Option<GpuError>>,
    lost: Mutex<Option<(String, String)>>,
}

impl ErrorSink {
    fn record(&self, e: wgpu::Error) {
        let mut first = self.first.lock().unwrap_or_else(|p| p.into_inner());
        if first.is_none() {
            *first = Some(convert_error(e, "running kernels"));
        }
    }

    pub(crate) fn take(&self) -> Result<(), GpuError> {
        if let Some((reason, message)) = self.lost.lock().unwrap_or_else(|p| p.into_inner()).clone()
        {
            return Err(GpuError::DeviceLost { reason, message });
        }
        match self.first.lock().unwrap_or_else(|p| p.into_inner()).take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

pub(crate) fn convert_error(e: wgpu::Error, context: &str) -> GpuError {
    match e {
        wgpu::Error::OutOfMemory { .. } => GpuError::OutOfMemory {
            context: context.to_string(),
        },
        wgpu::Error::Validation { description, .. } => GpuError::Validation {
            context: context.to_string(),
            message: description,
        },
        wgpu::Error::Internal { description, .. } => GpuError::Internal {
            context: context.to_string(),
            message: description,
        },
    }
}

/// An open GPU device with everything kernels need. Cheap to share (`Arc<Gpu>`); all methods
/// take `&self`.
pub struct Gpu {
    pub(crate) device: wgpu::Device,
    pub(crate) queue: wgpu::Queue,
    info: wgpu::AdapterInfo,
    limits: wgpu::Limits,
    features: KernelFeatures,
    defaults: BTreeMap<&'static str, Def>,
    pipelines: PipelineCache,
    pool: Arc<BufferPool>,
    pub(crate) errors: Arc<ErrorSink>,
}

fn device_rank(info: &wgpu::AdapterInfo) -> (u8, u8) {
    let ty = match info.device_type {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Other => 3,
        wgpu::DeviceType::Cpu => 4,
    };
    let backend = match info.backend {
        wgpu::Backend::Vulkan | wgpu::Backend::Metal | wgpu::Backend::Dx12 => 0,
        _ => 1,
    };
    (ty, backend)
}

/// One line describing an adapter.
pub fn describe_adapter(info: &wgpu::AdapterInfo) -> String {
    format!(
        "{} ({:?}, {:?}, driver {} {})",
        info.name, info.backend, info.device_type, info.driver, info.driver_info
    )
}

fn instance(backends: Option<wgpu::Backends>) -> wgpu::Instance {
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle();
    if let Some(b) = backends {
        desc.backends = b;
    }
    // with_env() is the only way WGPU_BACKEND (and WGPU_DEBUG etc.) take effect.
    wgpu::Instance::new(desc.with_env())
}

/// Every adapter wgpu can see, with whether it can run compute shaders.
pub fn list_adapters(backends: Option<wgpu::Backends>) -> Vec<(wgpu::AdapterInfo, bool)> {
    let inst = instance(backends);
    let adapters = pollster::block_on(inst.enumerate_adapters(wgpu::Backends::all()));
    adapters
        .iter()
        .map(|a| {
            let compute = a
                .get_downlevel_capabilities()
                .flags
                .contains(wgpu::DownlevelFlags::COMPUTE_SHADERS);
            (a.get_info(), compute)
        })
        .collect()
}

impl Gpu {
    /// Opens the best adapter (see [`GpuOptions`]).
    pub fn new(opts: GpuOptions) -> Result<Gpu, GpuError> {
        let inst = instance(opts.backends);
        let adapters = pollster::block_on(inst.enumerate_adapters(wgpu::Backends::all()));
        let usable: Vec<wgpu::Adapter> = adapters
            .into_iter()
            .filter(|a| {
                a.get_downlevel_capabilities()
                    .flags
                    .contains(wgpu::DownlevelFlags::COMPUTE_SHADERS)
            })
            .collect();
        if usable.is_empty() {
            let detail = match opts.backends.or_else(wgpu::Backends::from_env) {
                Some(b) => format!(" (backends allowed: {b:?})"),
                None => String::new(),
            };
            return Err(GpuError::NoAdapter { detail });
        }
        let wanted = opts
            .adapter_name
            .clone()
            .or_else(|| std::env::var("WGPU_ADAPTER_NAME").ok())
            .filter(|s| !s.is_empty());
        let adapter = match wanted {
            Some(name) => {
                let lname = name.to_lowercase();
                let names: Vec<String> = usable
                    .iter()
                    .map(|a| describe_adapter(&a.get_info()))
                    .collect();
                usable
                    .into_iter()
                    .find(|a| a.get_info().name.to_lowercase().contains(&lname))
                    .ok_or(GpuError::AdapterNotFound {
                        wanted: name,
                        available: names.join("; "),
                    })?
            }
            None => usable
                .into_iter()
                .min_by_key(|a| device_rank(&a.get_info()))
                .ok_or(GpuError::NoAdapter {
                    detail: String::new(),
                })?,
        };
        Self::from_adapter(adapter, &opts)
    }

    /// Opens one Gpu per usable adapter (for tests that run on every adapter).
    pub fn all(backends: Option<wgpu::Backends>) -> Vec<Result<Gpu, GpuError>> {
        let inst = instance(backends);
        let adapters = pollster::block_on(inst.enumerate_adapters(wgpu::Backends::all()));
        adapters
            .into_iter()
            .filter(|a| {
                a.get_downlevel_capabilities()
                    .flags
                    .contains(wgpu::DownlevelFlags::COMPUTE_SHADERS)
            })
            .map(|a| Self::from_adapter(a, &GpuOptions::default()))
            .collect()
    }

    fn from_adapter(adapter: wgpu::Adapter, opts: &GpuOptions) -> Result<Gpu, GpuError> {
        let info = adapter.get_info();
        let available = adapter.features();
        let mut required = wgpu::Features::empty();
        let mut want = wgpu::Features::TIMESTAMP_QUERY;
        if !opts.portable {
            want |= wgpu::Features::SUBGROUP | wgpu::Features::SHADER_F16;
        }
        for f in want.iter() {
            if available.contains(f) {
                required |= f;
            }
        }
        // The adapter's own limits: without this request wgpu hands out WebGPU defaults
        // (128 MiB bindings, 256 MiB buffers) even on GPUs with far more.
        let adapter_limits = adapter.limits();
        let limits = match &opts.limits {
            Some(l) => {
                if !l.check_limits(&adapter_limits) {
                    return Err(GpuError::RequestDevice {
                        adapter: describe_adapter(&info),
                        message: "requested limits exceed the adapter's".into(),
                    });
                }
                l.clone()
            }
            None => adapter_limits,
        };
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("prism"),
            required_features: required,
            required_limits: limits.clone(),
            ..Default::default()
        }))
        .map_err(|e| GpuError::RequestDevice {
            adapter: describe_adapter(&info),
            message: e.to_string(),
        })?;

        let errors = Arc::new(ErrorSink::default());
        let sink = errors.clone();
        device.on_uncaptured_error(Arc::new(move |e| sink.record(e)));
        let sink = errors.clone();
        device.set_device_lost_callback(move |reason, message| {
            *sink.lost.lock().unwrap_or_else(|p| p.into_inner()) =
                Some((format!("{reason:?}"), message));
        });

        let subgroups = required
            .contains(wgpu::Features::SUBGROUP)
            .then_some((info.subgroup_min_size, info.subgroup_max_size));
        let row_share = RowShare::for_subgroups(subgroups);
        let features = KernelFeatures {
            subgroups,
            shader_f16: required.contains(wgpu::Features::SHADER_F16),
            timestamps: required.contains(wgpu::Features::TIMESTAMP_QUERY),
            row_share,
            vectors_per_invocation: opts
                .vectors_per_invocation
                .unwrap_or(match info.device_type {
                    wgpu::DeviceType::Cpu => 8,
                    _ => 1,
                })
                .clamp(1, 64),
        };
        let mut defaults = BTreeMap::new();
        defaults.insert("subgroups", Def::Bool(row_share != RowShare::Direct));
        defaults.insert("row_share", Def::Str(row_share.as_str().into()));
        defaults.insert("f16", Def::Bool(features.shader_f16));
        // f16 arithmetic in masked layers; launchers turn it on for Precision::F16.
        defaults.insert("half", Def::Bool(false));
        Ok(Gpu {
            pool: Arc::new(BufferPool::default()),
            pipelines: PipelineCache::default(),
            device,
            queue,
            info,
            limits,
            features,
            defaults,
            errors,
        })
    }

    /// The adapter's identity.
    pub fn info(&self) -> &wgpu::AdapterInfo {
        &self.info
    }

    /// The limits the device was opened with.
    pub fn limits(&self) -> &wgpu::Limits {
        &self.limits
    }

    /// Optional capabilities in use.
    pub fn features(&self) -> &KernelFeatures {
        &self.features
    }

    /// The raw wgpu device (for benchmarks and advanced use).
    pub fn device(&self) -> &wgpu::Device {
        &self.device
    }

    /// The raw wgpu queue.
    pub fn queue(&self) -> &wgpu::Queue {
        &self.queue
    }

    /// Template variables every shader variant gets from the device.
    pub(crate) fn shader_defaults(&self) -> &BTreeMap<&'static str, Def> {
        &self.defaults
    }

    /// Naga capabilities matching the device.
    pub(crate) fn naga_capabilities(&self) -> naga::valid::Capabilities {
        shader::capabilities(
            self.features.row_share != RowShare::Direct,
            self.features.shader_f16,
        )
    }

    /// Starts building a launch of `entry` in the given shader variant.
    pub fn kernel(&self, shader: ShaderKey, entry: &str) -> KernelBuilder<'_> {
        KernelBuilder::new(self, shader, entry)
    }

    /// Number of compute pipelines compiled so far (tests assert it stops growing).
    pub fn pipelines_compiled(&self) -> u64 {
        self.pipelines.compiled()
    }

    /// Buffer-pool statistics (tests assert allocations stop growing).
    pub fn pool_stats(&self) -> PoolStats {
        self.pool.stats()
    }

    /// Records the kernels into one compute pass and submits them. Does not wait.
    pub fn submit(&self, kernels: &[&Kernel]) -> Result<(), GpuError> {
        let mut enc = self
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("prism kernels"),
            });
        {
            let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("prism"),
                timestamp_writes: None,
            });
            for k in kernels {
                k.record(&mut pass);
            }
        }
        self.queue.submit([enc.finish()]);
        self.errors.take()
    }

    /// Submits and waits until the GPU has finished, then reports any error it raised.
    pub fn run(&self, kernels: &[&Kernel]) -> Result<(), GpuError> {
        self.submit(kernels)?;
        self.sync()
    }

    /// Waits for all submitted work and surfaces asynchronous errors.
    pub fn sync(&self) -> Result<(), GpuError> {
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| GpuError::Poll(e.to_string()))?;
        self.errors.take()
    }

    /// Describes the device and its capabilities (what `prism info` prints).
    pub fn report(&self) -> String {
        let l = &self.limits;
        let f = &self.features;
        let mut s = String::new();
        s.push_str(&format!("adapter:   {}\n", self.info.name));
        s.push_str(&format!("backend:   {:?}\n", self.info.backend));
        s.push_str(&format!("type:      {:?}\n", self.info.device_type));
        s.push_str(&format!(
            "driver:    {} ({})\n",
            self.info.driver, self.info.driver_info
        ));
        s.push_str("features:\n");
        s.push_str(&format!(
            "  SUBGROUP         {}\n",
            match f.subgroups {
                Some((a, b)) => format!("yes (size {a}..{b})"),
                None => "no".into(),
            }
        ));
        s.push_str(&format!("  SHADER_F16       {}\n", yes(f.shader_f16)));
        s.push_str(&format!("  TIMESTAMP_QUERY  {}\n", yes(f.timestamps)));
        s.push_str(&format!("  matmul row sharing: {}\n", f.row_share.as_str()));
        s.push_str(&format!(
            "  streaming kernels: {} vec4 per invocation\n",
            f.vectors_per_invocation
        ));
        s.push_str("limits:\n");
        let limits: [(&str, u64); 6] = [
            ("max_buffer_size", l.max_buffer_size),
            (
                "max_storage_buffer_binding_size",
                l.max_storage_buffer_binding_size,
            ),
            (
                "max_storage_buffers_per_shader_stage",
                l.max_storage_buffers_per_shader_stage.into(),
            ),
            (
                "max_compute_workgroups_per_dimension",
                l.max_compute_workgroups_per_dimension.into(),
            ),
            (
                "max_compute_invocations_per_workgroup",
                l.max_compute_invocations_per_workgroup.into(),
            ),
            (
                "max_compute_workgroup_storage_size",
                l.max_compute_workgroup_storage_size.into(),
            ),
        ];
        for (name, value) in limits {
            s.push_str(&format!("  {name:<37} {value}\n"));
        }
        s
    }
}

fn yes(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

impl Drop for Gpu {
    fn drop(&mut self) {
        // Pooled buffers must go before the device; the pool holds the last references.
        self.pool.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::RowShare;

    /// What `octet.wgsl` computes for an invocation: its octet, its lane in the octet, and
    /// the subgroup lane that `subgroupShuffle(v, base + r)` reads for row r.
    fn octet_of(sg_id: u32, sg_lane: u32, size: u32) -> (u32, u32, u32) {
        ((sg_id * size + sg_lane) / 8, sg_lane % 8, sg_lane & !7)
    }

    /// Whether sharing by shuffle is sound for subgroups of `size` in a workgroup of 64: for
    /// every invocation and row r, the lane it reads is in its subgroup, is an invocation of
    /// the workgroup, and is lane r of the same octet.
    fn shuffle_sound(size: u32) -> bool {
        (0..64u32).all(|li| {
            let (sg_id, sg_lane) = (li / size, li % size);
            let (octet, _, base) = octet_of(sg_id, sg_lane, size);
            (0..8).all(|r| {
                let src = base + r;
                let src_li = sg_id * size + src;
                src < size && src_li < 64 && octet_of(sg_id, src, size) == (octet, r, base)
            })
        })
    }

    #[test]
    fn row_sharing_is_chosen_only_where_it_is_sound() {
        // Sizes real adapters report, and some they might: lavapipe 4/8/16, NVIDIA 32, AMD
        // 64 (32 to 64 on RDNA), Intel 8 to 32, Apple 32, Mali 16, Adreno 64 to 128.
        let cases = [
            (None, RowShare::Direct),
            (Some((1, 1)), RowShare::Direct),
            (Some((4, 4)), RowShare::Direct),
            (Some((4, 32)), RowShare::Direct),
            (Some((8, 8)), RowShare::Broadcast),
            (Some((8, 32)), RowShare::Shuffle),
            (Some((16, 16)), RowShare::Shuffle),
            (Some((32, 32)), RowShare::Shuffle),
            (Some((32, 64)), RowShare::Shuffle),
            (Some((64, 64)), RowShare::Shuffle),
            (Some((64, 128)), RowShare::Shuffle),
            (Some((12, 12)), RowShare::Direct),
            (Some((24, 24)), RowShare::Shuffle),
            (Some((20, 40)), RowShare::Direct),
            (Some((16, 8)), RowShare::Direct),
        ];
        for (sizes, want) in cases {
            assert_eq!(RowShare::for_subgroups(sizes), want, "{sizes:?}");
        }
        // Every size a chosen form may meet at run time is sound for it, and the sizes that
        // get no sharing are the ones where shuffles would cross octets or subgroups.
        for size in 1..=128u32 {
            let shuffle = RowShare::for_subgroups(Some((size, size))) != RowShare::Direct;
            if shuffle {
                assert!(shuffle_sound(size), "shuffle chosen but unsound at {size}");
            }
            if size % 8 != 0 {
                assert!(!shuffle, "size {size} must not share rows");
            }
        }
        assert!(!shuffle_sound(4) && !shuffle_sound(12));
        // Broadcast reads lane r of the subgroup itself: right only when the subgroup is the
        // octet.
        for size in [16u32, 32, 64] {
            let (_, _, base) = octet_of(0, 9, size);
            assert_ne!(
                base, 0,
                "at {size}, lane 9's octet does not start at lane 0"
            );
        }
    }
}
