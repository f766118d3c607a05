mod corruption;
mod golden;
mod helpers;
mod local_devices;
mod prune;
mod roundtrip;
