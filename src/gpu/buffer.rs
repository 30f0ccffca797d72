//! Tensors: pooled storage buffers with a shape, plus upload and readback.

use std::sync::Arc;

use super::pool::PooledBuffer;
use super::Gpu;
use crate::error::GpuError;

/// Element type of a tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    U32,
    /// IEEE half floats, two to a 32-bit word.
    F16,
}

impl DType {
    /// Bytes for `n` elements, rounded up to whole 32-bit words.
    pub fn bytes(self, n: usize) -> u64 {
        match self {
            DType::F32 | DType::U32 => 4 * n as u64,
            DType::F16 => (2 * n as u64).next_multiple_of(4),
        }
    }
}

/// A GPU tensor: a pooled storage buffer, its shape and element type. Kernels that bind the
/// tensor share its buffer, which goes back to the pool only when the tensor and every such
/// kernel are gone.
#[derive(Debug)]
pub struct Tensor {
    buf: Arc<PooledBuffer>,
    shape: Vec<usize>,
    dtype: DType,
}

const STORAGE: wgpu::BufferUsages = wgpu::BufferUsages::STORAGE
    .union(wgpu::BufferUsages::COPY_SRC)
    .union(wgpu::BufferUsages::COPY_DST);

impl Tensor {
    /// The shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// True when the tensor has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Size in bytes of the elements (not of the pooled buffer behind them).
    pub fn bytes(&self) -> u64 {
        self.dtype.bytes(self.len())
    }

    /// The underlying pooled buffer (shared with the kernels that bind it).
    pub fn pooled(&self) -> &Arc<PooledBuffer> {
        &self.buf
    }

    /// The wgpu buffer.
    pub fn buffer(&self) -> &wgpu::Buffer {
        self.buf.buffer()
    }

    /// Gives the tensor another shape with the same number of elements.
    pub fn reshape(mut self, shape: &[usize]) -> Result<Tensor, crate::Error> {
        if shape.iter().product::<usize>() != self.len() {
            return Err(crate::Error::invalid(format!(
                "cannot reshape {:?} to {:?}",
                self.shape, shape
            )));
        }
        self.shape = shape.to_vec();
        Ok(self)
    }
}

impl Gpu {
    /// A buffer of at least `size` bytes for `usage` from the pool (named `what` in errors).
    pub(crate) fn buffer_from_pool(
        &self,
        size: u64,
        usage: wgpu::BufferUsages,
        what: &str,
    ) -> Result<PooledBuffer, GpuError> {
        let max = self.limits.max_buffer_size;
        self.pool.take(&self.device, size, usage, max, what)
    }

    /// A tensor with unspecified contents (recycled buffers are not cleared).
    pub fn tensor(&self, shape: &[usize], dtype: DType, what: &str) -> Result<Tensor, GpuError> {
        let n: usize = shape.iter().product();
        let bytes = dtype.bytes(n).max(4);
        let buf = self.buffer_from_pool(bytes, STORAGE, what)?;
        Ok(Tensor {
            buf: Arc::new(buf),
            shape: shape.to_vec(),
            dtype,
        })
    }

    /// A tensor filled with zero bytes.
    pub fn zeros(&self, shape: &[usize], dtype: DType, what: &str) -> Result<Tensor, GpuError> {
        let t = self.tensor(shape, dtype, what)?;
        let mut enc = self.device.create_command_encoder(&Default::default());
        enc.clear_buffer(t.buffer(), 0, Some(t.buf.size().next_multiple_of(4)));
        self.queue.submit([enc.finish()]);
        Ok(t)
    }

    /// Uploads f32 data.
    pub fn upload_f32(
        &self,
        data: &[f32],
        shape: &[usize],
        what: &str,
    ) -> Result<Tensor, GpuError> {
        check_len(data.len(), shape, what)?;
        let t = self.tensor(shape, DType::F32, what)?;
        if !data.is_empty() {
            self.queue
                .write_buffer(t.buffer(), 0, bytemuck::cast_slice(data));
        }
        Ok(t)
    }

    /// Uploads u32 data.
    pub fn upload_u32(
        &self,
        data: &[u32],
        shape: &[usize],
        what: &str,
    ) -> Result<Tensor, GpuError> {
        check_len(data.len(), shape, what)?;
        let t = self.tensor(shape, DType::U32, what)?;
        if !data.is_empty() {
            self.queue
                .write_buffer(t.buffer(), 0, bytemuck::cast_slice(data));
        }
        Ok(t)
    }

    /// Uploads half floats.
    pub fn upload_f16(
        &self,
        data: &[half::f16],
        shape: &[usize],
        what: &str,
    ) -> Result<Tensor, GpuError> {
        check_len(data.len(), shape, what)?;
        let t = self.tensor(shape, DType::F16, what)?;
        let mut bytes: Vec<u8> = bytemuck::cast_slice(data).to_vec();
        bytes.resize(DType::F16.bytes(data.len()) as usize, 0);
        if !bytes.is_empty() {
            self.queue.write_buffer(t.buffer(), 0, &bytes);
        }
        Ok(t)
    }

    /// Overwrites a tensor's contents with f32 data of the same length.
    pub fn write_f32(&self, t: &Tensor, data: &[f32]) -> Result<(), GpuError> {
        check_len(data.len(), &t.shape, "write")?;
        if !data.is_empty() {
            self.queue
                .write_buffer(t.buffer(), 0, bytemuck::cast_slice(data));
        }
        Ok(())
    }

    /// Overwrites a tensor's contents with u32 data of the same length.
    pub fn write_u32(&self, t: &Tensor, data: &[u32]) -> Result<(), GpuError> {
        check_len(data.len(), &t.shape, "write")?;
        if !data.is_empty() {
            self.queue
                .write_buffer(t.buffer(), 0, bytemuck::cast_slice(data));
        }
        Ok(())
    }

    /// Copies one tensor's bytes into another of the same size.
    pub fn copy(&self, from: &Tensor, to: &Tensor) -> Result<(), GpuError> {
        if from.bytes() != to.bytes() {
            return Err(GpuError::Validation {
                context: "copying a tensor".into(),
                message: format!("{} bytes into {} bytes", from.bytes(), to.bytes()),
            });
        }
        let mut enc = self.device.create_command_encoder(&Default::default());
        enc.copy_buffer_to_buffer(from.buffer(), 0, to.buffer(), 0, from.bytes());
        self.queue.submit([enc.finish()]);
        Ok(())
    }

    /// Reads a tensor's raw bytes back (waits for all submitted work).
    pub fn read_bytes(&self, t: &Tensor) -> Result<Vec<u8>, GpuError> {
        let size = t.bytes();
        if size == 0 {
            return Ok(Vec::new());
        }
        let usage = wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST;
        let staging = self.buffer_from_pool(size, usage, "readback staging")?;
        let mut enc = self.device.create_command_encoder(&Default::default());
        enc.copy_buffer_to_buffer(t.buffer(), 0, staging.buffer(), 0, size);
        self.queue.submit([enc.finish()]);
        let slice = staging.buffer().slice(0..size);
        let (tx, rx) = std::sync::mpsc::channel();
        slice.map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        self.sync()?;
        match rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(GpuError::Map(e.to_string())),
            Err(_) => return Err(GpuError::Map("the map callback never ran".into())),
        }
        let out = {
            let view = slice
                .get_mapped_range()
                .map_err(|e| GpuError::Map(e.to_string()))?;
            view.to_vec()
        };
        staging.buffer().unmap();
        Ok(out)
    }

    /// Reads an f32 tensor back.
    pub fn read_f32(&self, t: &Tensor) -> Result<Vec<f32>, GpuError> {
        let bytes = self.read_bytes(t)?;
        Ok(bytemuck::pod_collect_to_vec(&bytes))
    }

    /// Reads a u32 tensor back.
    pub fn read_u32(&self, t: &Tensor) -> Result<Vec<u32>, GpuError> {
        let bytes = self.read_bytes(t)?;
        Ok(bytemuck::pod_collect_to_vec(&bytes))
    }

    /// Reads an f16 tensor back.
    pub fn read_f16(&self, t: &Tensor) -> Result<Vec<half::f16>, GpuError> {
        let bytes = self.read_bytes(t)?;
        let mut v: Vec<half::f16> = bytemuck::pod_collect_to_vec(&bytes);
        v.truncate(t.len());
        Ok(v)
    }
}

fn check_len(n: usize, shape: &[usize], what: &str) -> Result<(), GpuError> {
    let expect: usize = shape.iter().product();
    if n != expect {
        return Err(GpuError::Validation {
            context: format!("uploading {what}"),
            message: format!("{n} elements for shape {shape:?} ({expect} elements)"),
        });
    }
    Ok(())
}
