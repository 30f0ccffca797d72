//! A federation written out by hand with the library's API (the crate root, nothing else):
//! three clients train locally on their shards of MNIST, upload 1-bit masks as wire messages,
//! the server takes them in and aggregates them with PRISM's strategy (MADA included), and the
//! result is saved as a model file and drawn as a grid. `prism::run` does the same with
//! checkpoints, metrics and progress; this is the loop for people who orchestrate clients
//! themselves (another scheduler, other machines).
//!
//! `cargo run --release --example federation_by_hand -- [DATA_DIR]` (MNIST is looked up as
//! README says when no folder is given).

use prism::{
    load_dataset, masks_from_scores, receive, write_grid, Gpu, HostRng, Images, MaskKind, Model,
    Partition, Prism, RangeCoder, Split, Strategy, TrainConfig, Trainer, Upload,
};

fn main() -> Result<(), prism::Error> {
    let data = std::env::args().nth(1).map(std::path::PathBuf::from);
    let cfg = TrainConfig {
        clients: 3,
        local_steps: 20,
        ..Default::default()
    };
    let gpu = Gpu::new(Default::default())?;
    let (train, arch) = load_dataset(
        &cfg.dataset,
        data.as_deref(),
        false,
        Split::Train,
        &cfg.arch,
        cfg.seed,
    )?;
    let shards = Partition::parse(&cfg.partition)?;
    let parts = shards.split(
        &train.labels,
        cfg.clients,
        &mut HostRng::new(cfg.seed, &[1]),
    )?;

    // Client side: one trainer (the network at the batch size, the loss), a state per client.
    let trainer = Trainer::new(&gpu, &cfg, &arch, &train, &parts)?;
    let mut clients = (0..cfg.clients)
        .map(|_| trainer.new_client_state(&gpu))
        .collect::<Result<Vec<_>, _>>()?;
    // Server side: the global scores, and the strategy.
    let mut server = trainer.new_server(&gpu, &cfg)?;
    let mut strategy = Prism::default();
    let sizes = trainer.layer_sizes();

    for round in 0..3u32 {
        let selected = strategy.configure_fit(round, cfg.clients, &mut HostRng::new(7, &[round]));
        let mut uploads: Vec<Upload> = Vec::new();
        for &k in &selected {
            // On client k: local steps from the global scores, then a mask sample to upload.
            let local = trainer.local_run(&gpu, k, round, &server.scores, &mut clients[k])?;
            let upload = Upload {
                round,
                client: k as u32,
                layers: local.upload,
            };
            let bytes = prism::encode(&upload, &sizes, Some(&RangeCoder));
            // On the server: decode and validate the message before it counts.
            match receive(
                &bytes,
                &sizes,
                round,
                &selected,
                &uploads,
                Some(&RangeCoder),
            ) {
                Ok(up) => uploads.push(up),
                Err(reason) => eprintln!("client {k}'s upload refused: {reason:?}"),
            }
            let last = local.losses.last().copied().unwrap_or(f32::NAN);
            println!(
                "round {round} client {k}: loss {last:.4}, {} bytes up",
                bytes.len()
            );
        }
        let report = strategy.aggregate_fit(&gpu, round, &mut server, &uploads, &[])?;
        println!(
            "round {round}: {} uploads, MADA lambda {:?}",
            report.used, report.lambda
        );
    }

    // The final model: the architecture's seed plus one mask sample of the global scores.
    let scores = server.read_scores(&gpu)?;
    let mut model = Model {
        masks: masks_from_scores(&scores, MaskKind::Sample, cfg.seed),
        arch,
        seed: cfg.seed,
        mask_kind: MaskKind::Sample,
        dataset: cfg.dataset.clone(),
        population: None,
    };
    // BatchNorm's population statistics under the final mask, so that generation from the
    // file does not depend on the batch size.
    model.calibrate(&gpu)?;
    std::fs::create_dir_all("runs/by_hand").map_err(|e| prism::Error::io("runs/by_hand", e))?;
    model.save("runs/by_hand/model.prism".as_ref())?;
    let generator = model.generator(&gpu, 64)?;
    let images = generator.generate(&gpu, 64, 0)?;
    let batch = Images {
        values: &images,
        count: 64,
        shape: generator.image,
    };
    write_grid("runs/by_hand/samples.png".as_ref(), &batch, 8)?;
    println!("runs/by_hand/model.prism, runs/by_hand/samples.png");
    Ok(())
}
