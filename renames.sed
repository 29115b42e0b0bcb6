s/\brecords\.summarize\b/records.summary/g
s/\brecords\.repair\b/records.cut_partial_lines/g
s/\(^\|[^._[:alnum:]]\)repair(/\1cut_partial_lines(/g
s/\(^\|[^._[:alnum:]]\)summarize(/\1summary(/g
/^[ "]*from \(laion_nb\)\?\.\?\.\?records import/s/\brepair\b/cut_partial_lines/g
/^[ "]*from \(laion_nb\)\?\.\?\.\?records import/s/\bsummarize\b/summary/g
s/\bimages\.sniff\b/images._sniff/g
s/\bimages\.jpeg_layout\b/images._jpeg_layout/g
s/\bimages\.JpegLayout\b/images._JpegLayout/g
s/\bimages\.PixelBudget\b/images._PixelBudget/g
s/\bimages\.PIXEL_BUDGET\b/images._PIXEL_BUDGET/g
s/\bimages\.RESIZE_MODES\b/images._RESIZE_MODES/g
s/\bfetch\.backoff_delay\b/fetch._backoff_delay/g
s/\bfetch\.opted_out\b/fetch._opted_out/g
s/\bfetch\.tls_context\b/fetch._tls_context/g
s/\bfetch\.USER_AGENT\b/fetch._USER_AGENT/g
s/\bfetch\.OPT_OUT_TAGS\b/fetch._OPT_OUT_TAGS/g
s/\bfetch\.TLS_READ_BUFFER\b/fetch._TLS_READ_BUFFER/g
s/\bmetadata\.find_shards\b/metadata._find_shards/g
s/\bmetadata\.shard_digits\b/metadata._shard_digits/g
s/\bmetadata\.pick_column\b/metadata._pick_column/g
s/\bmetadata\.is_meta_dir\b/metadata._is_meta_dir/g
