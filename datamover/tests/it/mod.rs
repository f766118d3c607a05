mod corruption;
mod fuzz;
mod golden;
mod helpers;
mod local_devices;
mod prune;
mod roundtrip;
