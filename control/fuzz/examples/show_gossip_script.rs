//! Prints the steps of a `gossip_datagram` input (a crash or corpus file), as the harness
//! reads them: `cargo run --example show_gossip_script FILE`.

use control_fuzz::Input;
use control_fuzz::gossip::Step;

fn main() {
    let path = std::env::args().nth(1).expect("usage: show_gossip_script FILE");
    let data = std::fs::read(&path).expect("readable input");
    let mut input = Input::new(&data);
    while !input.is_empty() {
        println!("{:?}", Step::read(&mut input));
    }
}
