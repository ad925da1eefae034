//! The Pico W image: embassy glue around `fogline_pico_w::session::run`.
//!
//! Boot: read the configuration block from the last flash sector, start the CYW43439
//! (Wi-Fi firmware and NVRAM from the `cyw43-setup`/`cyw43-firmware` crates), embassy-net
//! with DHCP, the LED task, I2C0 for the sensor; draw a boot id from the ring oscillator;
//! then run the device loop forever. Everything that decides something is in the library
//! and tested on the host; this file only wires hardware to its traits.
//!
//! On the host this builds as an empty program, so that `cargo test` can build the crate.
#![cfg_attr(target_os = "none", no_std, no_main)]

#[cfg(not(target_os = "none"))]
fn main() {
    eprintln!("fogline-pico-w is firmware for the Raspberry Pi Pico W: build it with build.sh");
}

#[cfg(target_os = "none")]
mod image {
    use core::sync::atomic::{AtomicU8, Ordering};

    use cyw43::JoinOptions;
    use cyw43_pio::{PioSpi, DEFAULT_CLOCK_DIVIDER};
    use embassy_executor::Spawner;
    use embassy_net::dns::DnsQueryType;
    use embassy_net::tcp::TcpSocket;
    use embassy_net::{IpAddress, Stack, StackResources};
    use embassy_rp::clocks::RoscRng;
    use embassy_rp::flash::{Blocking, Flash};
    use embassy_rp::gpio::{Level, Output};
    use embassy_rp::peripherals::{DMA_CH0, PIO0};
    use embassy_rp::{bind_interrupts, dma, i2c, pio};
    use embassy_sync::blocking_mutex::raw::CriticalSectionRawMutex;
    use embassy_sync::mutex::Mutex;
    use embassy_time::{with_timeout, Delay, Duration, Instant, Timer};
    use fogline_firmware::node::{Node, NodeConfig, Slot};
    use fogline_pico_w::boot_id;
    use fogline_pico_w::config::{Config, BLOCK_OFFSET, FLASH_SIZE, SECTOR_SIZE};
    use fogline_pico_w::led::{self, LedState};
    use fogline_pico_w::mqtt::MinimqConn;
    use fogline_pico_w::sensors::AnySensor;
    use fogline_pico_w::session::{self, Clock, Connector, Device, Indicator, LinkConfig};
    use static_cell::StaticCell;

    /// Readings kept while the agent is unreachable: 32 bytes each, 64 KiB of RAM; with
    /// the three BME280 metrics every 10 s that is about 1 h 50 min of outage.
    const RING_LEN: usize = 2048;
    /// Readings published and not yet acked by the agent.
    const MAX_IN_FLIGHT: usize = 32;
    /// Frames between the node and the MQTT client.
    const OUTBOX_LEN: usize = 4;
    /// MQTT keepalive; the TCP idle timeout is twice it.
    const KEEPALIVE_S: u16 = 30;

    type ControlMutex = Mutex<CriticalSectionRawMutex, cyw43::Control<'static>>;

    bind_interrupts!(struct Irqs {
        PIO0_IRQ_0 => pio::InterruptHandler<PIO0>;
        DMA_IRQ_0 => dma::InterruptHandler<DMA_CH0>;
    });

    /// What the LED shows ([`LedState::code`]); written by the loop and the connector,
    /// read by the LED task.
    static LED: AtomicU8 = AtomicU8::new(0);

    fn show(state: LedState) {
        LED.store(state.code(), Ordering::Relaxed);
    }

    /// A sensor must come back by itself: a panic resets the chip, and the new boot
    /// starts numbering under a new boot id.
    #[panic_handler]
    fn panic(_info: &core::panic::PanicInfo) -> ! {
        cortex_m::peripheral::SCB::sys_reset()
    }

    #[embassy_executor::task]
    async fn wifi_task(
        runner: cyw43::Runner<'static, cyw43::SpiBus<Output<'static>, PioSpi<'static, PIO0, 0>>>,
    ) -> ! {
        runner.run().await
    }

    #[embassy_executor::task]
    async fn net_task(mut runner: embassy_net::Runner<'static, cyw43::NetDriver<'static>>) -> ! {
        runner.run().await
    }

    /// Blinks the LED (GPIO 0 of the CYW43439) in the pattern of the current state.
    #[embassy_executor::task]
    async fn led_task(control: &'static ControlMutex) -> ! {
        let mut lit = None;
        loop {
            let state = LedState::from_code(LED.load(Ordering::Relaxed));
            let now = Instant::now().as_millis();
            let on = led::is_on(state, now);
            if lit != Some(on) {
                // While a Wi-Fi join holds the chip, the LED keeps its last level.
                if let Ok(mut control) = control.try_lock() {
                    control.gpio_set(0, on).await;
                    lit = Some(on);
                }
            }
            // Wake at the next edge, and at least every 100 ms to see state changes.
            let next = led::next_change(state, now).min(now + 100);
            Timer::at(Instant::from_millis(next)).await;
        }
    }

    struct EmbassyClock;

    impl Clock for EmbassyClock {
        fn now_ms(&self) -> u64 {
            Instant::now().as_millis()
        }

        async fn sleep_until(&self, at_ms: u64) {
            Timer::at(Instant::from_millis(at_ms)).await
        }
    }

    struct Led;

    impl Indicator for Led {
        fn show(&mut self, state: LedState) {
            show(state);
        }
    }

    /// Why a connection attempt failed.
    #[derive(Debug, Clone, Copy)]
    enum ConnectError {
        WifiJoin,
        Dhcp,
        Dns,
        Tcp,
        Mqtt,
        Timeout,
    }

    /// Wi-Fi join (when the link is down), DHCP, DNS, TCP and MQTT CONNECT.
    struct PicoConnector {
        config: Config<'static>,
        stack: Stack<'static>,
        control: &'static ControlMutex,
        session: minimq::Session<'static>,
        rx: &'static mut [u8],
        tx: &'static mut [u8],
    }

    impl Connector for PicoConnector {
        type Conn<'a> = MinimqConn<'a, 'static, TcpSocket<'a>>;
        type Error = ConnectError;

        async fn connect(&mut self) -> Result<Self::Conn<'_>, ConnectError> {
            if !self.stack.is_link_up() {
                show(LedState::JoiningWifi);
                let options = if self.config.wifi_password.is_empty() {
                    JoinOptions::new_open()
                } else {
                    JoinOptions::new(self.config.wifi_password.as_bytes())
                };
                let mut control = self.control.lock().await;
                with_timeout(
                    Duration::from_secs(30),
                    control.join(self.config.wifi_ssid, options),
                )
                .await
                .map_err(|_| ConnectError::Timeout)?
                .map_err(|_| ConnectError::WifiJoin)?;
            }
            with_timeout(Duration::from_secs(30), self.stack.wait_config_up())
                .await
                .map_err(|_| ConnectError::Dhcp)?;
            show(LedState::ConnectingToAgent);
            let address = match self.config.agent_ipv4() {
                Some([a, b, c, d]) => IpAddress::v4(a, b, c, d),
                None => {
                    let found = with_timeout(
                        Duration::from_secs(10),
                        self.stack
                            .dns_query(self.config.agent_host, DnsQueryType::A),
                    )
                    .await
                    .map_err(|_| ConnectError::Timeout)?
                    .map_err(|_| ConnectError::Dns)?;
                    *found.first().ok_or(ConnectError::Dns)?
                }
            };
            let mut socket = TcpSocket::new(self.stack, self.rx, self.tx);
            socket.set_timeout(Some(Duration::from_secs(2 * u64::from(KEEPALIVE_S))));
            with_timeout(
                Duration::from_secs(10),
                socket.connect((address, self.config.agent_port)),
            )
            .await
            .map_err(|_| ConnectError::Timeout)?
            .map_err(|_| ConnectError::Tcp)?;
            let conn = with_timeout(Duration::from_secs(10), self.session.connect(socket))
                .await
                .map_err(|_| ConnectError::Timeout)?
                .map_err(|_| ConnectError::Mqtt)?;
            Ok(MinimqConn::new(conn))
        }
    }

    /// Waits forever, the LED saying why (no configuration, an unusable one).
    async fn halt(state: LedState) -> ! {
        show(state);
        loop {
            Timer::after_secs(3_600).await;
        }
    }

    #[embassy_executor::main]
    async fn main(spawner: Spawner) {
        let p = embassy_rp::init(Default::default());

        // The configuration block, read once; the parsed strings borrow it for good.
        static BLOCK: StaticCell<[u8; SECTOR_SIZE]> = StaticCell::new();
        let block = BLOCK.init([0xFF; SECTOR_SIZE]);
        let mut flash = Flash::<_, Blocking, FLASH_SIZE>::new_blocking(p.FLASH);
        let read = flash.blocking_read(BLOCK_OFFSET, block);
        let block: &'static [u8; SECTOR_SIZE] = block;
        let config = match read {
            Ok(()) => Config::parse(block),
            Err(_) => Err(fogline_pico_w::config::ParseError::Truncated),
        };

        // The Wi-Fi chip, on PIO0 (the Pico W wires it to GPIO 23, 24, 25 and 29).
        let pwr = Output::new(p.PIN_23, Level::Low);
        let cs = Output::new(p.PIN_25, Level::High);
        let mut pio = pio::Pio::new(p.PIO0, Irqs);
        let spi = PioSpi::new(
            &mut pio.common,
            pio.sm0,
            DEFAULT_CLOCK_DIVIDER,
            pio.irq0,
            cs,
            p.PIN_24,
            p.PIN_29,
            dma::Channel::new(p.DMA_CH0, Irqs),
        );
        static WIFI: StaticCell<cyw43::State> = StaticCell::new();
        let (net_device, mut control, runner) = cyw43::new(
            WIFI.init(cyw43::State::new()),
            pwr,
            spi,
            &cyw43_setup::FW,
            &cyw43_setup::NVRAM,
        )
        .await;
        if let Ok(task) = wifi_task(runner) {
            spawner.spawn(task);
        }
        control.init(cyw43_setup::CLM).await;
        control
            .set_power_management(cyw43::PowerManagementMode::PowerSave)
            .await;
        static CONTROL: StaticCell<ControlMutex> = StaticCell::new();
        let control: &'static ControlMutex = CONTROL.init(Mutex::new(control));
        show(LedState::JoiningWifi);
        if let Ok(task) = led_task(control) {
            spawner.spawn(task);
        }

        let Ok(config) = config else {
            halt(LedState::NotProvisioned).await
        };

        let mut rng = RoscRng;
        let boot = boot_id::from_words(|| rng.next_u32())
            .unwrap_or_else(|_| boot_id::fallback(Instant::now().as_ticks()));

        static NET: StaticCell<StackResources<3>> = StaticCell::new();
        let (stack, net_runner) = embassy_net::new(
            net_device,
            embassy_net::Config::dhcpv4(Default::default()),
            NET.init(StackResources::new()),
            rng.next_u64(),
        );
        if let Ok(task) = net_task(net_runner) {
            spawner.spawn(task);
        }

        static RING: StaticCell<[Slot; RING_LEN]> = StaticCell::new();
        let node_config = NodeConfig {
            sample_period_ms: u64::from(config.sample_period_ms),
            max_in_flight: MAX_IN_FLIGHT,
            resend_after_ms: 30_000,
            ..NodeConfig::new(config.device, boot)
        };
        let Ok(node) = Node::new(node_config, RING.init([Slot::EMPTY; RING_LEN])) else {
            halt(LedState::NotProvisioned).await
        };

        // The sensor on I2C0: SDA on GP4 (pin 6), SCL on GP5 (pin 7), 100 kHz.
        let bus = i2c::I2c::new_blocking(p.I2C0, p.PIN_5, p.PIN_4, i2c::Config::default());
        let Ok(sensor) = AnySensor::<_, Delay>::new(config.sensor, config.sensor_address(), bus)
        else {
            halt(LedState::NotProvisioned).await
        };

        static MQTT_RX: StaticCell<[u8; 512]> = StaticCell::new();
        static MQTT_TX: StaticCell<[u8; 4096]> = StaticCell::new();
        let buffers = minimq::Buffers::new(MQTT_RX.init([0; 512]), MQTT_TX.init([0; 4096]));
        let mut mqtt = minimq::ConfigBuilder::new(buffers).keepalive_interval(KEEPALIVE_S);
        if !config.username.is_empty() {
            mqtt = match mqtt.auth(config.username, config.password.as_bytes()) {
                Ok(m) => m,
                Err(_) => halt(LedState::NotProvisioned).await,
            };
        }
        let Ok(mqtt) = mqtt.client_id(config.device) else {
            halt(LedState::NotProvisioned).await
        };

        static SOCKET_RX: StaticCell<[u8; 1024]> = StaticCell::new();
        static SOCKET_TX: StaticCell<[u8; 2048]> = StaticCell::new();
        let mut connector = PicoConnector {
            config,
            stack,
            control,
            session: minimq::Session::new(mqtt),
            rx: SOCKET_RX.init([0; 1024]),
            tx: SOCKET_TX.init([0; 2048]),
        };
        let mut device: Device<_, _, _, OUTBOX_LEN> =
            Device::new(node, sensor, Delay, LinkConfig::default());
        let mut random = || rng.next_u32();
        let never = session::run(
            &mut device,
            &mut connector,
            &EmbassyClock,
            &mut Led,
            &mut random,
        )
        .await;
        match never {}
    }
}
