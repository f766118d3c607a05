mod corruption;
mod fuzz;
mod golden;
mod helpers;
mod incremental;
mod local_devices;
mod prune;
mod roundtrip;
