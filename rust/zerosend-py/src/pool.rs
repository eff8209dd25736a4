//! Memory for `zerosend.BufferPool`: one locked, page-aligned region cut into buffers that
//! Python code fills through the buffer protocol and that io_uring sends as fixed buffers.

use std::ffi::c_int;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use pyo3::exceptions::{PyBufferError, PyValueError};
use pyo3::prelude::*;
use pyo3::{ffi, intern};

use zerosend::Region;

use crate::errors::to_pyerr;

const PAGE: usize = 4096;

/// A locked, page-aligned region holding `count` buffers of `size` bytes.
#[pyclass(frozen, module = "zerosend._native")]
pub struct PoolMemory {
    pub(crate) region: Arc<Region>,
    count: usize,
    size: usize,
    stride: usize,
    /// Why huge pages were asked for but not used, if so.
    #[pyo3(get)]
    hugepages_fallback: Option<String>,
}

#[pymethods]
impl PoolMemory {
    #[new]
    #[pyo3(signature = (count, size, hugepages = false))]
    fn new(count: usize, size: usize, hugepages: bool) -> PyResult<Self> {
        if count == 0 || size == 0 {
            return Err(PyValueError::new_err(
                "a buffer pool needs count >= 1 and size >= 1",
            ));
        }
        // Every buffer starts on a page boundary.
        let stride = size.div_ceil(PAGE) * PAGE;
        let total = stride
            .checked_mul(count)
            .ok_or_else(|| PyValueError::new_err("count * size overflows"))?;
        let (region, hugepages_fallback) = Region::new(total, hugepages).map_err(to_pyerr)?;
        Ok(Self {
            region: Arc::new(region),
            count,
            size,
            stride,
            hugepages_fallback,
        })
    }

    #[getter]
    fn count(&self) -> usize {
        self.count
    }

    #[getter]
    fn size(&self) -> usize {
        self.size
    }

    #[getter]
    fn hugepages(&self) -> bool {
        self.region.huge_pages()
    }

    /// A fresh handle on buffer `index`; `on_free(index)` is called once it was released and no
    /// export of it (an in-flight send, a memoryview) remains.
    fn buffer(&self, index: usize, on_free: Py<PyAny>) -> PyResult<PoolBuffer> {
        if index >= self.count {
            return Err(PyValueError::new_err(format!(
                "buffer index {index} out of range (pool of {})",
                self.count
            )));
        }
        Ok(PoolBuffer {
            region: Arc::clone(&self.region),
            offset: index * self.stride,
            len: self.size,
            index,
            exports: AtomicUsize::new(0),
            released: AtomicBool::new(false),
            on_free: Mutex::new(Some(on_free)),
        })
    }
}

/// One writable buffer of a pool (use `memoryview(buf)` to fill it, send it or a slice of it).
#[pyclass(frozen, module = "zerosend._native")]
pub struct PoolBuffer {
    region: Arc<Region>,
    offset: usize,
    len: usize,
    #[pyo3(get)]
    index: usize,
    /// Live buffer exports: in-flight sends and memoryviews.
    exports: AtomicUsize,
    released: AtomicBool,
    on_free: Mutex<Option<Py<PyAny>>>,
}

impl PoolBuffer {
    /// Hands the buffer back to its pool, once: after release() and with no export left.
    fn give_back_if_free(&self, py: Python<'_>) -> PyResult<()> {
        let exported = self.exports.load(Ordering::Acquire) != 0
            && !zerosend::mutant::active(zerosend::mutant::POOL_BUFFER_BACK_WHILE_EXPORTED);
        if !self.released.load(Ordering::Acquire) || exported {
            return Ok(());
        }
        let callback = self
            .on_free
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(callback) = callback {
            callback.call1(py, (self.index,))?;
        }
        Ok(())
    }
}

impl Drop for PoolBuffer {
    fn drop(&mut self) {
        // Garbage-collected without release(): nothing can export it any more (every view holds
        // a reference to it), so it goes back to its pool now rather than never.
        if !self.released.swap(true, Ordering::AcqRel) {
            Python::attach(|py| {
                if let Err(err) = self.give_back_if_free(py) {
                    err.write_unraisable(py, None);
                }
            });
        }
    }
}

#[pymethods]
impl PoolBuffer {
    fn __len__(&self) -> usize {
        self.len
    }

    /// True once `release()` was called.
    #[getter]
    fn released(&self) -> bool {
        self.released.load(Ordering::Acquire)
    }

    /// Returns the buffer to its pool. If a send of it is still in flight (or a memoryview of
    /// it is alive), it goes back only when the kernel released it (the view was released).
    fn release(&self, py: Python<'_>) -> PyResult<()> {
        if self.released.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        self.give_back_if_free(py)
    }

    fn __repr__(&self) -> String {
        let state = if self.released() { " released" } else { "" };
        format!(
            "<zerosend.PoolBuffer index={} size={}{state}>",
            self.index, self.len
        )
    }

    /// # Safety
    /// Called by CPython with a valid `view` to fill.
    unsafe fn __getbuffer__(
        slf: Bound<'_, Self>,
        view: *mut ffi::Py_buffer,
        flags: c_int,
    ) -> PyResult<()> {
        let this = slf.get();
        if this.released() {
            return Err(PyBufferError::new_err(
                "this pool buffer was released back to its pool; acquire a new one",
            ));
        }
        // SAFETY: offset + len lies inside the region (checked when the handle was made).
        let ptr = unsafe { this.region.as_ptr().add(this.offset) };
        // SAFETY: `view` is CPython's to fill; the region lives as long as `slf`, which the view
        // references (FillInfo takes a reference to it), so the pointer stays valid while the
        // export exists.
        let rc = unsafe {
            ffi::PyBuffer_FillInfo(
                view,
                slf.as_ptr(),
                ptr.cast(),
                this.len as ffi::Py_ssize_t,
                0,
                flags,
            )
        };
        if rc != 0 {
            return Err(PyErr::fetch(slf.py()));
        }
        this.exports.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    /// # Safety
    /// Called by CPython when an export made by `__getbuffer__` ends.
    unsafe fn __releasebuffer__(&self, _view: *mut ffi::Py_buffer) {
        self.exports.fetch_sub(1, Ordering::AcqRel);
        Python::attach(|py| {
            if let Err(err) = self.give_back_if_free(py) {
                err.write_unraisable(
                    py,
                    Some(&intern!(py, "zerosend pool callback").clone().into_any()),
                );
            }
        });
    }
}
