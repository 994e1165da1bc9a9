//! Nothing here: the package exists for its benches (`cargo bench -p palisade-benches`).
