"""One reader per upstream source family; each parses files into validated source records.

Readers only parse and validate (boxes converted to xyxy pixels of the original image); how a record
becomes a dialogue (random start turn, templates, `<bbox>`/`[VG]` placement) is dialogues.py's job.
"""
