s/\brecords\.summarize\b/records.summary/g
