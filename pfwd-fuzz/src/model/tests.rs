//! The model against etherparse: its checksum arithmetic, its parser, and hand-computed translations.
