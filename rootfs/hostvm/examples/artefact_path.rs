//! Prints the path of a built artefact as the artefact index records it:
//! `artefact_path rootfs-base`. Used inside the host VM by the integration tests, to show that
//! code there finds artefacts through the same index API as outside.

use roost_images::{ArtefactIndex, Cache};

fn main() {
    let Some(name) = std::env::args().nth(1) else {
        eprintln!("usage: artefact_path NAME");
        std::process::exit(2);
    };
    let found = Cache::from_env()
        .map_err(|e| e.to_string())
        .and_then(|cache| {
            ArtefactIndex::new(&cache)
                .lookup(&name)
                .map_err(|e| e.to_string())
        });
    match found {
        Ok(artefact) => println!("{}", artefact.path.display()),
        Err(e) => {
            eprintln!("artefact_path: {e}");
            std::process::exit(1);
        }
    }
}
