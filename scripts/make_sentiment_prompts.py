"""Writes w2s_engine/data/sentiment_prompts.json: openings of movie reviews, split 3 ways."""
import json, random
aspects = ["plot", "acting", "ending", "soundtrack", "pacing", "dialogue", "cinematography",
           "casting", "script", "humor", "score", "editing"]
kinds = ["film", "movie", "picture", "sequel", "remake", "documentary"]
openings = [f"The {a} of this {k}" for a in aspects for k in kinds]
openings += [f"This {k} {v}" for k in ["film", "movie", "sequel", "remake", "comedy", "thriller",
                                       "horror flick", "documentary", "musical", "western"]
             for v in ["was", "is", "tries to", "starts", "left me"]]
openings += [
    "I really", "I honestly", "I went into this", "I have to say", "I can't believe",
    "I watched this", "I rented this", "I expected", "I was surprised", "I wanted to",
    "I have seen", "I do not usually", "I laughed", "I fell asleep", "I will never forget",
    "My wife and I", "My kids", "My friends dragged me to see this, and", "We rented this",
    "We saw this at a festival and", "After reading the book, I", "As a fan of the director, I",
    "Going in with low expectations, I", "From the opening scene,", "Ten minutes in, I",
    "By the end of the movie, I", "Critics called it", "Despite the hype,", "If you like",
    "Not since", "What starts as", "Few films", "It is rare that", "Every time I watch",
    "Nothing about", "Somehow, this", "The lead actress", "The villain", "The director",
    "The first half hour", "The second act", "The final scene", "The special effects",
    "The main character", "The supporting cast", "The writers", "The studio", "Watching it again,",
    "On paper, this", "Two hours later,", "Say what you will, but", "Let me start by saying",
    "The trailer", "The theater was", "Halfway through,", "The story", "The premise",
    "The costumes", "The music", "The camera work", "The twist", "The romance",
    "The action scenes", "The child actors", "The animation", "The voice acting",
    "Compared to the original,", "For a low budget film,", "For a blockbuster,",
    "As a horror fan, I", "As someone who grew up with the books, I", "Believe it or not,",
    "Honestly,", "Frankly,", "To be fair,", "In short,", "Overall,", "Sadly,", "Surprisingly,",
]
openings += [f"{lead} the {a}" for a in aspects
             for lead in ["I thought", "Nobody warned me about", "What struck me most was",
                          "Let's talk about", "I still think about"]]
openings += [f"{when} this {k}, and" for k in ["film", "movie", "sequel", "comedy", "thriller",
                                              "documentary", "musical", "western"]
             for when in ["Last night I saw", "Yesterday we watched", "My brother recommended"]]
openings = sorted(set(openings))
random.Random(2405).shuffle(openings)
n = len(openings)
test, dev = openings[:50], openings[50:100]
train = openings[100:]
json.dump({"description": "Openings of movie reviews written for w2s-engine (like the truncated "
           "IMDB reviews of Zhou et al. 2024). The tuned model is trained on 'train' only; "
           "'dev' picks settings; 'test' is for reported results.",
           "train": train, "dev": dev, "test": test},
          open("w2s_engine/data/sentiment_prompts.json", "w"), indent=1)
print(n, len(train), len(dev), len(test))
