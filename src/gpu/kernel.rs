//! Kernel launches: a pipeline, its bind group and its workgroup count, built once and
//! recorded as often as needed (a training step records the same kernels every step).

use std::sync::Arc;

use super::pipeline::PipelineEntry;
use super::pool::PooledBuffer;
use super::shader::ShaderKey;
use super::{Gpu, Tensor};
use crate::error::GpuError;

/// Splits `n` workgroups into a 3-D grid whose dimensions stay within `max` each. Kernels
/// recover the linear id with `linear_workgroup` (shaders/common.wgsl) and skip ids >= n.
pub fn fold_workgroups(n: u32, max: u32) -> [u32; 3] {
    let max = max.max(1);
    if n <= max {
        return [n, 1, 1];
    }
    let y = n.div_ceil(max);
    if y <= max {
        // Spread evenly so that the last row wastes little.
        let x = n.div_ceil(y);
        return [x, y, 1];
    }
    let z = y.div_ceil(max);
    [max, max, z]
}

/// A ready-to-record launch. Cloning is cheap (shared handles): a composite program, such as a
/// loss built from an encoder's passes, lists the kernels of its parts.
#[derive(Clone)]
pub struct Kernel {
    entry: Arc<PipelineEntry>,
    bind_group: wgpu::BindGroup,
    workgroups: [u32; 3],
    _params: Option<Arc<PooledBuffer>>,
    /// The pooled buffers the bind group references: held so that the pool cannot lend them
    /// out again while this kernel may still run.
    _bound: Vec<Arc<PooledBuffer>>,
}

impl Kernel {
    /// Records the dispatch into a compute pass.
    pub fn record(&self, pass: &mut wgpu::ComputePass<'_>) {
        if self.workgroups.contains(&0) {
            return;
        }
        pass.set_pipeline(&self.entry.pipeline);
        pass.set_bind_group(0, &self.bind_group, &[]);
        pass.dispatch_workgroups(self.workgroups[0], self.workgroups[1], self.workgroups[2]);
    }

    /// "shader\[variant\]::entry".
    pub fn label(&self) -> &str {
        &self.entry.label
    }

    /// The dispatch grid.
    pub fn workgroups(&self) -> [u32; 3] {
        self.workgroups
    }
}

struct Bound<'a> {
    name: String,
    buffer: &'a wgpu::Buffer,
    size: u64,
    owner: Option<Arc<PooledBuffer>>,
}

/// Builds a [`Kernel`]: buffers are bound by their WGSL variable names, the parameter block
/// (`var<uniform> p`) from a plain-old-data struct.
pub struct KernelBuilder<'a> {
    gpu: &'a Gpu,
    shader: ShaderKey,
    entry: String,
    params: Option<Vec<u8>>,
    bound: Vec<Bound<'a>>,
    workgroups: Option<u32>,
    /// Binding problems found while binding, reported by `build`.
    errors: Vec<String>,
}

impl<'a> KernelBuilder<'a> {
    pub(crate) fn new(gpu: &'a Gpu, shader: ShaderKey, entry: &str) -> Self {
        Self {
            gpu,
            shader: shader.with_defaults(gpu.shader_defaults()),
            entry: entry.to_string(),
            params: None,
            bound: Vec::new(),
            workgroups: None,
            errors: Vec::new(),
        }
    }

    /// The uniform parameter block, bound to the variable `p`.
    pub fn params<T: bytemuck::Pod>(mut self, p: &T) -> Self {
        self.params = Some(bytemuck::bytes_of(p).to_vec());
        self
    }

    /// Binds a tensor to the storage variable `name`. The kernel keeps the tensor's buffer
    /// out of the pool for as long as it lives.
    pub fn bind(mut self, name: &str, t: &'a Tensor) -> Self {
        self.bound.push(Bound {
            name: name.to_string(),
            buffer: t.buffer(),
            size: t.bytes().max(4),
            owner: Some(t.pooled().clone()),
        });
        self
    }

    /// Binds a tensor to `name` with its size rounded up to a multiple of `align` bytes, so that
    /// a kernel may view it as an array of vectors whose last one runs past the tensor's end
    /// (into the buffer's own padding; the kernel must not let those lanes matter). Pool
    /// buffers are padded to their size class, so this fails only for an exact-size buffer
    /// near the device limit.
    pub fn bind_padded(mut self, name: &str, t: &'a Tensor, align: u64) -> Self {
        let size = t.bytes().max(4).next_multiple_of(align);
        if size > t.buffer().size() {
            self.errors.push(format!(
                "`{name}` ({} bytes) has no padding to {align} bytes in its {}-byte buffer",
                t.bytes(),
                t.buffer().size()
            ));
        }
        self.bound.push(Bound {
            name: name.to_string(),
            buffer: t.buffer(),
            size,
            owner: Some(t.pooled().clone()),
        });
        self
    }

    /// Binds the first `size` bytes of a buffer the caller keeps alive to the variable `name`.
    pub fn bind_buffer(mut self, name: &str, buffer: &'a wgpu::Buffer, size: u64) -> Self {
        self.bound.push(Bound {
            name: name.to_string(),
            buffer,
            size,
            owner: None,
        });
        self
    }

    /// The number of workgroups (folded into a 3-D grid when it exceeds the per-dimension
    /// limit).
    pub fn groups(mut self, n: u32) -> Self {
        self.workgroups = Some(n);
        self
    }

    /// Compiles (or fetches from the cache) and binds.
    pub fn build(self) -> Result<Kernel, GpuError> {
        let gpu = self.gpu;
        let entry = gpu.pipelines.get(
            &gpu.device,
            gpu.naga_capabilities(),
            &self.shader,
            &self.entry,
        )?;
        if let Some(e) = self.errors.first() {
            return Err(GpuError::Validation {
                context: format!("building {}", entry.label),
                message: e.clone(),
            });
        }
        let max_binding = gpu.limits.max_storage_buffer_binding_size;
        let params = match &self.params {
            Some(bytes) => {
                let size = (bytes.len() as u64).next_multiple_of(16);
                let usage = wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST;
                let buf = gpu.buffer_from_pool(size, usage, "kernel parameters")?;
                let mut padded = bytes.clone();
                padded.resize(size as usize, 0);
                gpu.queue.write_buffer(buf.buffer(), 0, &padded);
                Some(buf)
            }
            None => None,
        };
        let mut entries = Vec::new();
        for b in &entry.bindings {
            if b.name == "p" {
                let buf = params.as_ref().ok_or_else(|| GpuError::Validation {
                    context: format!("building {}", entry.label),
                    message: "the kernel reads parameters `p` but none were given".into(),
                })?;
                entries.push(wgpu::BindGroupEntry {
                    binding: b.binding,
                    resource: buf.binding(),
                });
                continue;
            }
            let found = self
                .bound
                .iter()
                .find(|x| x.name == b.name)
                .ok_or_else(|| GpuError::Validation {
                    context: format!("building {}", entry.label),
                    message: format!("no buffer bound to `{}`", b.name),
                })?;
            if found.size > max_binding {
                return Err(GpuError::BindingTooLarge {
                    what: format!("`{}` of {}", b.name, entry.label),
                    bytes: found.size,
                    limit: max_binding,
                });
            }
            entries.push(wgpu::BindGroupEntry {
                binding: b.binding,
                resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                    buffer: found.buffer,
                    offset: 0,
                    size: std::num::NonZeroU64::new(found.size),
                }),
            });
        }
        for x in &self.bound {
            if !entry.bindings.iter().any(|b| b.name == x.name) {
                return Err(GpuError::Validation {
                    context: format!("building {}", entry.label),
                    message: format!("the kernel has no binding named `{}`", x.name),
                });
            }
        }
        let scope = gpu.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let bind_group = gpu.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some(&entry.label),
            layout: &entry.layout,
            entries: &entries,
        });
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(super::convert_error(e, &format!("binding {}", entry.label)));
        }
        let n = self.workgroups.unwrap_or(1);
        let max = gpu.limits.max_compute_workgroups_per_dimension as u64;
        if n as u64 > max * max * max {
            return Err(GpuError::Validation {
                context: format!("building {}", entry.label),
                message: format!(
                    "{n} workgroups exceed this adapter's grid of {max}^3; use a smaller batch"
                ),
            });
        }
        let workgroups = fold_workgroups(n, max as u32);
        let bound = self.bound.iter().filter_map(|b| b.owner.clone()).collect();
        Ok(Kernel {
            entry,
            bind_group,
            workgroups,
            _params: params.map(Arc::new),
            _bound: bound,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::fold_workgroups;

    #[test]
    fn folding_covers_and_respects_the_limit() {
        for &(n, max) in &[
            (1u32, 65_535u32),
            (65_535, 65_535),
            (65_536, 65_535),
            (10_000_000, 65_535),
            (300, 7),
            (50, 7),
            (7 * 7 * 7, 7),
        ] {
            let [x, y, z] = fold_workgroups(n, max);
            assert!(x <= max && y <= max && z <= max, "{n} {max}: {x} {y} {z}");
            assert!((x as u64) * (y as u64) * (z as u64) >= n as u64);
            // Waste at most one row (or plane) of the grid.
            assert!((x as u64) * (y as u64) * (z as u64) < n as u64 + (x as u64) * (y as u64));
        }
    }
}
