"""Live text for the tests of live contexts (issue 12)."""

# A live broadcast's captions: each about 3 s of speech.
CAPTIONS = [
    "Good evening and welcome to the news.",
    "Heavy rain is expected across the north tonight.",
    "Several roads near the river are already closed.",
    "Drivers are asked to avoid the area until morning.",
    "In sport, the home team won their third match in a row.",
    "The coach praised the defence after a tense final minute.",
    "Tickets for the final go on sale next week.",
    "Now the weather for the weekend ahead.",
    "Saturday will be dry with some bright spells.",
    "Sunday brings more rain and a strong wind from the west.",
    "That is all from us for tonight.",
    "Thank you for watching and good night.",
]
