//! `canaryd demo`: the whole thing, live, on this machine.

pub mod procs;
