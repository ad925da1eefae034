//! Placeholder for the host build; the image is built for thumbv6m-none-eabi.
#![cfg_attr(target_os = "none", no_std, no_main)]

#[cfg(not(target_os = "none"))]
fn main() {
    eprintln!("fogline-pico-w is firmware for the Raspberry Pi Pico W: build it with build.sh");
}
