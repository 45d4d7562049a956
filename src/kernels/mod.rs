//! Attention kernels that read the packed cache directly. Each has a plain reference in
//! [`crate::reference`] that the tests compare it with.

pub mod cpu;
