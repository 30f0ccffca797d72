//! Buffer pool: buffers are recycled by (size class, usage), so that work repeated with the
//! same shapes (a training step, a generation batch) allocates nothing after the first time.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::error::GpuError;

/// Counters of the pool, for tests and reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Buffers created on the device so far.
    pub allocations: u64,
    /// Bytes of those buffers.
    pub allocated_bytes: u64,
    /// Bytes currently lent out.
    pub live_bytes: u64,
    /// Highest `live_bytes` seen.
    pub peak_bytes: u64,
}

#[derive(Default)]
pub(crate) struct BufferPool {
    free: Mutex<HashMap<(u64, wgpu::BufferUsages), Vec<wgpu::Buffer>>>,
    allocations: AtomicU64,
    allocated_bytes: AtomicU64,
    live_bytes: AtomicU64,
    peak_bytes: AtomicU64,
}

/// Rounds a size up to its class: four classes per power of two (at most 25% slack), and
/// at least 256 bytes.
pub(crate) fn size_class(size: u64) -> u64 {
    let size = size.max(256);
    let top = 63 - size.leading_zeros() as u64; // floor(log2)
    let step = 1u64 << top.saturating_sub(2);
    size.div_ceil(step) * step
}

impl BufferPool {
    pub(crate) fn take(
        self: &Arc<Self>,
        device: &wgpu::Device,
        size: u64,
        usage: wgpu::BufferUsages,
        max_buffer_size: u64,
        what: &str,
    ) -> Result<PooledBuffer, GpuError> {
        if size > max_buffer_size {
            return Err(GpuError::BufferTooLarge {
                what: what.to_string(),
                bytes: size,
                limit: max_buffer_size,
            });
        }
        // The class may not exceed the device limit; sizes near the limit get an exact buffer.
        let class = size_class(size)
            .min(max_buffer_size & !3)
            .max(size.next_multiple_of(4));
        let reused = self
            .free
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(&(class, usage))
            .and_then(|v| v.pop());
        let buffer = match reused {
            Some(b) => b,
            None => {
                let scope = device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
                let b = device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some(what),
                    size: class,
                    usage,
                    mapped_at_creation: false,
                });
                if let Some(e) = pollster::block_on(scope.pop()) {
                    return Err(super::convert_error(
                        e,
                        &format!("allocating {what} ({class} bytes)"),
                    ));
                }
                self.allocations.fetch_add(1, Ordering::Relaxed);
                self.allocated_bytes.fetch_add(class, Ordering::Relaxed);
                b
            }
        };
        let live = self.live_bytes.fetch_add(class, Ordering::Relaxed) + class;
        self.peak_bytes.fetch_max(live, Ordering::Relaxed);
        Ok(PooledBuffer {
            buffer: Some(buffer),
            size,
            class,
            usage,
            pool: self.clone(),
        })
    }

    fn give_back(&self, buffer: wgpu::Buffer, class: u64, usage: wgpu::BufferUsages) {
        self.live_bytes.fetch_sub(class, Ordering::Relaxed);
        self.free
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry((class, usage))
            .or_default()
            .push(buffer);
    }

    pub(crate) fn stats(&self) -> PoolStats {
        PoolStats {
            allocations: self.allocations.load(Ordering::Relaxed),
            allocated_bytes: self.allocated_bytes.load(Ordering::Relaxed),
            live_bytes: self.live_bytes.load(Ordering::Relaxed),
            peak_bytes: self.peak_bytes.load(Ordering::Relaxed),
        }
    }

    pub(crate) fn clear(&self) {
        self.free.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }
}

/// A buffer lent by the pool; it goes back when dropped. `size` is what was asked for; the
/// buffer itself may be larger (its size class).
pub struct PooledBuffer {
    buffer: Option<wgpu::Buffer>,
    size: u64,
    class: u64,
    usage: wgpu::BufferUsages,
    pool: Arc<BufferPool>,
}

impl PooledBuffer {
    /// The wgpu buffer.
    pub fn buffer(&self) -> &wgpu::Buffer {
        self.buffer.as_ref().expect("present until drop")
    }

    /// The size that was asked for, in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The binding covering exactly the requested size.
    pub fn binding(&self) -> wgpu::BindingResource<'_> {
        wgpu::BindingResource::Buffer(wgpu::BufferBinding {
            buffer: self.buffer(),
            offset: 0,
            size: std::num::NonZeroU64::new(self.size.next_multiple_of(4)),
        })
    }
}

impl Drop for PooledBuffer {
    fn drop(&mut self) {
        if let Some(b) = self.buffer.take() {
            self.pool.give_back(b, self.class, self.usage);
        }
    }
}

impl std::fmt::Debug for PooledBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PooledBuffer({} bytes)", self.size)
    }
}

#[cfg(test)]
mod tests {
    use super::size_class;

    #[test]
    fn size_classes_bound_slack() {
        assert_eq!(size_class(1), 256);
        assert_eq!(size_class(256), 256);
        for s in [257u64, 1000, 4097, 65_537, 1_000_000, 123_456_789] {
            let c = size_class(s);
            assert!(c >= s && (c as f64) <= s as f64 * 1.25 + 1.0, "{s} -> {c}");
        }
    }
}
