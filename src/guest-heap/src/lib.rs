//! The heap of a policy guest. The host runs every decision in a fresh instance and discards it
//! after the one call, so nothing a guest allocates needs to come back: allocation bumps a pointer
//! through the memory the module starts with (from `__heap_base`) and grows the memory by whole
//! pages when that runs out. Freeing or resizing the most recent allocation works in place, so a
//! growing `String` or `Vec` does not leave its old copies behind.
//!
//! Linking this crate makes [`BumpHeap`] the global allocator of a `wasm32` guest; `use guest_heap
//! as _;` is enough. Elsewhere (the crate's own tests) it only provides the type.
//!
//! It also gives a `no_std` guest the two things the standard library would: the canonical ABI's
//! `cabi_realloc` (over the same heap) and a panic handler (a trap). A guest without the standard
//! library imports nothing from WASI, so its component is a single core module with no imports: the
//! host sets up less for each call than for the standard library's WASI imports and the adapter
//! modules that satisfy them.
#![no_std]

use core::alloc::{GlobalAlloc, Layout};
use core::cell::Cell;
use core::ptr;

/// The WebAssembly page size.
pub const PAGE_BYTES: usize = 65536;

/// Where a heap lives: the address it starts at, the end of the usable memory, and a way to
/// make more usable.
pub trait Memory {
    /// The first free address and the end of the memory as the instance starts.
    fn initial(&self) -> (usize, usize);
    /// Adds `pages` pages at the end of the memory; `false` when the memory may not grow.
    fn grow(&self, pages: usize) -> bool;
}

/// A bump allocator over `M`. Single-threaded: a component instance runs one call on one thread.
pub struct BumpHeap<M> {
    memory: M,
    /// The next free address; 0 until the first allocation reads [`Memory::initial`].
    top: Cell<usize>,
    /// The end of the usable memory.
    end: Cell<usize>,
}

impl<M: Memory> BumpHeap<M> {
    pub const fn with_memory(memory: M) -> Self {
        Self {
            memory,
            top: Cell::new(0),
            end: Cell::new(0),
        }
    }

    /// Bytes handed out and not given back at the top.
    pub fn used_from(&self, start: usize) -> usize {
        self.top.get().saturating_sub(start)
    }

    fn start(&self) {
        if self.top.get() == 0 {
            let (top, end) = self.memory.initial();
            self.top.set(top);
            self.end.set(end);
        }
    }

    /// Makes the memory reach `new_top`; `false` when it cannot grow that far.
    fn reach(&self, new_top: usize) -> bool {
        let end = self.end.get();
        if new_top <= end {
            return true;
        }
        let pages = (new_top - end).div_ceil(PAGE_BYTES);
        let Some(grown) = pages
            .checked_mul(PAGE_BYTES)
            .and_then(|bytes| end.checked_add(bytes))
        else {
            return false;
        };
        if !self.memory.grow(pages) {
            return false;
        }
        self.end.set(grown);
        true
    }

    /// Moves the top to `new_top` if the memory reaches it.
    fn bump_to(&self, new_top: Option<usize>) -> bool {
        match new_top {
            Some(new_top) if self.reach(new_top) => {
                self.top.set(new_top);
                true
            }
            _ => false,
        }
    }

    fn is_top(&self, ptr: *mut u8, size: usize) -> bool {
        (ptr as usize).checked_add(size) == Some(self.top.get())
    }
}

// SAFETY: a guest instance is single-threaded (wasm32 without threads), and the type is only
// installed as the global allocator there; the host-side tests use it from one thread each.
unsafe impl<M> Sync for BumpHeap<M> {}

unsafe impl<M: Memory> GlobalAlloc for BumpHeap<M> {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        self.start();
        let Some(start) = self.top.get().checked_next_multiple_of(layout.align()) else {
            return ptr::null_mut();
        };
        if self.bump_to(start.checked_add(layout.size())) {
            start as *mut u8
        } else {
            ptr::null_mut()
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if self.is_top(ptr, layout.size()) {
            self.top.set(ptr as usize);
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if self.is_top(ptr, layout.size()) {
            return if self.bump_to((ptr as usize).checked_add(new_size)) {
                ptr
            } else {
                ptr::null_mut()
            };
        }
        if new_size <= layout.size() {
            // A block below the top shrinks where it is; its tail is not reused.
            return ptr;
        }
        // SAFETY: the caller guarantees `new_size`, rounded up to the alignment, does not
        // overflow isize, which is all `from_size_align_unchecked` needs.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        // SAFETY: `new_layout` has a non-zero size, as the caller guarantees for `new_size`.
        let new = unsafe { self.alloc(new_layout) };
        if !new.is_null() {
            // SAFETY: both blocks are live and distinct (the new one lies above the top the old
            // one was below), each at least `min(old, new)` bytes long.
            unsafe { ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size)) };
        }
        new
    }
}

/// The guest's linear memory: the heap starts at the linker's `__heap_base` and ends where the
/// memory does; `memory.grow` adds to it.
#[cfg(target_arch = "wasm32")]
pub struct LinearMemory;

#[cfg(target_arch = "wasm32")]
impl Memory for LinearMemory {
    fn initial(&self) -> (usize, usize) {
        unsafe extern "C" {
            static __heap_base: u8;
        }
        // Only the address of the linker-defined symbol is taken, never its value.
        let base = ptr::addr_of!(__heap_base) as usize;
        (base, core::arch::wasm32::memory_size(0) * PAGE_BYTES)
    }

    fn grow(&self, pages: usize) -> bool {
        core::arch::wasm32::memory_grow(0, pages) != usize::MAX
    }
}

#[cfg(target_arch = "wasm32")]
#[global_allocator]
static HEAP: BumpHeap<LinearMemory> = BumpHeap::with_memory(LinearMemory);

/// C's allocation functions over the same heap. wasi-libc calls `malloc` itself (setting up the
/// environment and stdio); defining these here keeps its dlmalloc, which would claim the same
/// memory from `__heap_base`, out of the module altogether.
#[cfg(target_arch = "wasm32")]
mod c_heap {
    use super::HEAP;

    /// # Safety
    /// As C's `malloc`.
    #[unsafe(no_mangle)]
    pub unsafe extern "C" fn malloc(size: usize) -> *mut u8 {
        // SAFETY: forwarded with C's contract.
        unsafe { HEAP.c_malloc(size) }
    }

    /// # Safety
    /// As C's `free`.
    #[unsafe(no_mangle)]
    pub unsafe extern "C" fn free(data: *mut u8) {
        // SAFETY: forwarded with C's contract.
        unsafe { HEAP.c_free(data) }
    }

    /// # Safety
    /// As C's `calloc`.
    #[unsafe(no_mangle)]
    pub unsafe extern "C" fn calloc(count: usize, size: usize) -> *mut u8 {
        // SAFETY: forwarded with C's contract.
        unsafe { HEAP.c_calloc(count, size) }
    }

    /// # Safety
    /// As C's `realloc`.
    #[unsafe(no_mangle)]
    pub unsafe extern "C" fn realloc(data: *mut u8, size: usize) -> *mut u8 {
        // SAFETY: forwarded with C's contract.
        unsafe { HEAP.c_realloc(data, size) }
    }
}

/// C blocks start with their size, padded to C's largest alignment on wasm32.
const C_HEADER: usize = 16;

fn c_layout(size: usize) -> Option<Layout> {
    Layout::from_size_align(size.checked_add(C_HEADER)?, C_HEADER).ok()
}

impl<M: Memory> BumpHeap<M> {
    /// C's `malloc`.
    ///
    /// # Safety
    /// As [`GlobalAlloc::alloc`].
    pub unsafe fn c_malloc(&self, size: usize) -> *mut u8 {
        let Some(layout) = c_layout(size) else {
            return ptr::null_mut();
        };
        // SAFETY: the layout is at least C_HEADER bytes.
        let block = unsafe { self.alloc(layout) };
        if block.is_null() {
            return block;
        }
        // SAFETY: the block is C_HEADER-aligned and starts with room for the header.
        unsafe {
            block.cast::<usize>().write(size);
            block.add(C_HEADER)
        }
    }

    /// C's `free`.
    ///
    /// # Safety
    /// `data` is null or a live block from [`Self::c_malloc`], [`Self::c_calloc`] or
    /// [`Self::c_realloc`] of this heap.
    pub unsafe fn c_free(&self, data: *mut u8) {
        if data.is_null() {
            return;
        }
        // SAFETY: `data` follows its header, whose size made a valid layout when allocated.
        unsafe {
            let block = data.sub(C_HEADER);
            let size = block.cast::<usize>().read();
            self.dealloc(
                block,
                Layout::from_size_align_unchecked(size + C_HEADER, C_HEADER),
            );
        }
    }

    /// C's `calloc`.
    ///
    /// # Safety
    /// As [`GlobalAlloc::alloc`].
    pub unsafe fn c_calloc(&self, count: usize, size: usize) -> *mut u8 {
        let Some(bytes) = count.checked_mul(size) else {
            return ptr::null_mut();
        };
        // SAFETY: as c_malloc. A top block freed earlier may be handed out again: zero it.
        unsafe {
            let data = self.c_malloc(bytes);
            if !data.is_null() {
                data.write_bytes(0, bytes);
            }
            data
        }
    }

    /// C's `realloc`.
    ///
    /// # Safety
    /// As [`Self::c_free`] for `data`.
    pub unsafe fn c_realloc(&self, data: *mut u8, size: usize) -> *mut u8 {
        if data.is_null() {
            // SAFETY: as c_malloc.
            return unsafe { self.c_malloc(size) };
        }
        let Some(new_layout) = c_layout(size) else {
            return ptr::null_mut();
        };
        // SAFETY: `data` follows its header; the new size makes a valid layout.
        unsafe {
            let block = data.sub(C_HEADER);
            let old_size = block.cast::<usize>().read();
            let old = Layout::from_size_align_unchecked(old_size + C_HEADER, C_HEADER);
            let moved = self.realloc(block, old, new_layout.size());
            if moved.is_null() {
                return moved;
            }
            moved.cast::<usize>().write(size);
            moved.add(C_HEADER)
        }
    }
}

/// The canonical ABI's allocation function, through which the host moves strings and lists into
/// the guest: the global allocator, as the standard library would define it.
///
/// # Safety
/// As the canonical ABI's `realloc`: `old` is null with `old_len` 0, or a block of `old_len`
/// bytes at `align` from an earlier call; `align` is a power of two.
#[cfg(target_arch = "wasm32")]
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cabi_realloc(
    old: *mut u8,
    old_len: usize,
    align: usize,
    new_len: usize,
) -> *mut u8 {
    if new_len == 0 {
        // A well-aligned, never dereferenced address, as for any empty allocation.
        return align as *mut u8;
    }
    // SAFETY: the caller guarantees `align` is a power of two; the sizes are not zero.
    unsafe {
        if old_len == 0 {
            HEAP.alloc(Layout::from_size_align_unchecked(new_len, align))
        } else {
            HEAP.realloc(
                old,
                Layout::from_size_align_unchecked(old_len, align),
                new_len,
            )
        }
    }
}

// The C library's memory functions (`memcmp` and the like, which compiled Rust calls), as the
// standard library would link them; none of them imports anything.
#[cfg(target_arch = "wasm32")]
#[link(name = "c")]
unsafe extern "C" {}

/// A panic traps: the host reports the call as failed and falls back, as for any trap. (With the
/// standard library a panic would write to stderr first, an import that traps here anyway.)
#[cfg(target_arch = "wasm32")]
#[panic_handler]
fn panic(_: &core::panic::PanicInfo<'_>) -> ! {
    core::arch::wasm32::unreachable()
}

#[cfg(test)]
extern crate std;

#[cfg(test)]
mod tests {
    use super::*;
    use std::boxed::Box;
    use std::vec;

    /// A host buffer standing in for a linear memory of `pages` pages, of which `limit` may be
    /// used; `initial` are usable from the start.
    struct Buffer {
        bytes: Box<[u8]>,
        initial: usize,
        used_pages: Cell<usize>,
        limit: usize,
    }

    impl Buffer {
        fn new(initial: usize, limit: usize) -> Self {
            Self {
                bytes: vec![0u8; (limit + 1) * PAGE_BYTES].into_boxed_slice(),
                initial,
                used_pages: Cell::new(initial),
                limit,
            }
        }

        /// The first page-aligned address in the buffer, standing in for address 0.
        fn base(&self) -> usize {
            (self.bytes.as_ptr() as usize).next_multiple_of(PAGE_BYTES)
        }
    }

    impl Memory for &Buffer {
        fn initial(&self) -> (usize, usize) {
            // The heap starts 100 bytes in, as after a module's data and stack.
            (self.base() + 100, self.base() + self.initial * PAGE_BYTES)
        }

        fn grow(&self, pages: usize) -> bool {
            let wanted = self.used_pages.get() + pages;
            if wanted > self.limit {
                return false;
            }
            self.used_pages.set(wanted);
            true
        }
    }

    fn layout(size: usize, align: usize) -> Layout {
        Layout::from_size_align(size, align).expect("a valid layout")
    }

    #[test]
    fn allocations_are_aligned_distinct_and_within_the_memory() {
        let buffer = Buffer::new(1, 4);
        let heap = BumpHeap::with_memory(&buffer);
        let mut previous_end = 0;
        for (size, align) in [(3, 1), (8, 8), (1, 16), (70_000, 4), (5, 2)] {
            let p = unsafe { heap.alloc(layout(size, align)) } as usize;
            assert_ne!(p, 0);
            assert_eq!(p % align, 0, "{size} bytes aligned to {align}");
            assert!(p >= previous_end, "does not overlap the previous block");
            previous_end = p + size;
            assert!(previous_end <= buffer.base() + buffer.used_pages.get() * PAGE_BYTES);
        }
        // 100 bytes in, then about 70,020 bytes: two pages.
        assert_eq!(
            buffer.used_pages.get(),
            2,
            "grew by whole pages, only as needed"
        );
    }

    #[test]
    fn the_top_block_frees_and_grows_in_place() {
        let buffer = Buffer::new(1, 2);
        let heap = BumpHeap::with_memory(&buffer);
        let start = buffer.base() + 100;
        let a = unsafe { heap.alloc(layout(10, 1)) };
        let b = unsafe { heap.alloc(layout(10, 1)) };
        unsafe { b.write(7) };
        let grown = unsafe { heap.realloc(b, layout(10, 1), 100_000) };
        assert_eq!(grown, b, "the top block grows where it is");
        assert_eq!(heap.used_from(start), 10 + 100_000);
        unsafe { heap.dealloc(grown, layout(100_000, 1)) };
        assert_eq!(
            heap.used_from(start),
            10,
            "freeing the top block gives its bytes back"
        );
        unsafe { heap.dealloc(a, layout(10, 1)) };
        assert_eq!(heap.used_from(start), 0);
    }

    #[test]
    fn a_block_below_the_top_moves_with_its_bytes() {
        let buffer = Buffer::new(1, 1);
        let heap = BumpHeap::with_memory(&buffer);
        let a = unsafe { heap.alloc(layout(4, 4)) };
        unsafe { a.copy_from([1u8, 2, 3, 4].as_ptr(), 4) };
        let b = unsafe { heap.alloc(layout(4, 4)) };
        let moved = unsafe { heap.realloc(a, layout(4, 4), 8) };
        assert!(moved as usize >= b as usize + 4, "moved above the top");
        let mut bytes = [0u8; 4];
        unsafe { moved.copy_to(bytes.as_mut_ptr(), 4) };
        assert_eq!(bytes, [1, 2, 3, 4]);
        let top = unsafe { heap.alloc(layout(1, 1)) } as usize;
        assert_eq!(top, moved as usize + 8);
        assert_eq!(
            unsafe { heap.realloc(b, layout(4, 4), 2) },
            b,
            "a block below the top shrinks in place"
        );
        assert_eq!(unsafe { heap.alloc(layout(1, 1)) } as usize, top + 1);
        unsafe { heap.dealloc(b, layout(2, 4)) };
        assert_eq!(
            unsafe { heap.alloc(layout(4, 4)) } as usize,
            (top + 2).next_multiple_of(4),
            "freeing a block below the top gives nothing back"
        );
    }

    #[test]
    fn c_blocks_keep_their_bytes_through_realloc_and_calloc_zeroes() {
        let buffer = Buffer::new(1, 2);
        let heap = BumpHeap::with_memory(&buffer);
        unsafe {
            let a = heap.c_malloc(3);
            assert_eq!(a as usize % C_HEADER, 0, "aligned as C expects");
            a.copy_from([7u8, 8, 9].as_ptr(), 3);
            let b = heap.c_malloc(5);
            let moved = heap.c_realloc(a, 100);
            assert!(moved as usize > b as usize, "a block below the top moves");
            let mut bytes = [0u8; 3];
            moved.copy_to(bytes.as_mut_ptr(), 3);
            assert_eq!(bytes, [7, 8, 9]);
            let grown = heap.c_realloc(moved, 70_000);
            assert_eq!(grown, moved, "the top block grows in place");
            grown.write_bytes(0xff, 70_000);
            heap.c_free(grown);
            let zeroed = heap.c_calloc(10, 7);
            assert_eq!(zeroed, grown, "the freed top block is handed out again");
            let mut bytes = [1u8; 70];
            zeroed.copy_to(bytes.as_mut_ptr(), 70);
            assert_eq!(bytes, [0u8; 70], "calloc zeroes what it hands out");
            assert!(heap.c_calloc(usize::MAX, 2).is_null());
            assert!(heap.c_malloc(usize::MAX - 8).is_null());
            heap.c_free(ptr::null_mut());
        }
    }

    #[test]
    fn running_out_of_memory_is_a_null_pointer_not_a_wrap() {
        let buffer = Buffer::new(1, 2);
        let heap = BumpHeap::with_memory(&buffer);
        let a = unsafe { heap.alloc(layout(PAGE_BYTES, 1)) };
        assert!(!a.is_null());
        assert!(unsafe { heap.alloc(layout(2 * PAGE_BYTES, 1)) }.is_null());
        assert!(unsafe { heap.realloc(a, layout(PAGE_BYTES, 1), 3 * PAGE_BYTES) }.is_null());
        assert!(unsafe { heap.alloc(layout(isize::MAX as usize - 64, 1)) }.is_null());
        assert!(
            !unsafe { heap.alloc(layout(100, 1)) }.is_null(),
            "small blocks still fit"
        );
    }
}
