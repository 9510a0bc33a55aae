//! Fuzzes the qcow2 header parser: any input must parse or be refused, never panic. An
//! accepted header must also survive serialisation: `to_bytes` then `parse` gives it back
//! (up to where the backing name is placed, a feature table left out for room, and feature
//! names that are not UTF-8).

#![no_main]

use libfuzzer_sys::fuzz_target;
use vmimg::qcow2::Header;

fuzz_target!(|data: &[u8]| {
    let _ = Header::peek_cluster_bits(data);
    let Ok(header) = Header::parse(data) else {
        return;
    };
    let _ = header.geometry().l1_entries_for(header.size);
    let _ = (header.refcount_bits(), header.compat_name());
    let Ok(mut bytes) = header.to_bytes() else {
        return;
    };
    bytes.resize(1 << header.cluster_bits, 0);
    let mut back = Header::parse(&bytes)
        .unwrap_or_else(|e| panic!("serialised header does not parse: {e}\n{header:?}"));
    back.backing_file_offset = header.backing_file_offset;
    back.backing_file_size = header.backing_file_size;
    // Feature names are compared by kind and bit only: names that are not UTF-8 are read
    // lossily (U+FFFD), and so do not come back byte for byte.
    if !back.feature_names.is_empty() {
        let key = |h: &Header| {
            h.feature_names
                .iter()
                .map(|f| (f.kind, f.bit))
                .collect::<Vec<_>>()
        };
        assert_eq!(key(&back), key(&header), "feature table changed");
    }
    back.feature_names = header.feature_names.clone();
    assert_eq!(back, header, "header changed through to_bytes + parse");
});
